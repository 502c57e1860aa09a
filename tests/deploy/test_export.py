import importlib.util
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from emanet.cli import main as cli  # noqa: E402
from emanet.config import Config  # noqa: E402
from emanet.deploy import export as export_mod  # noqa: E402
from emanet.deploy.export import OnnxNotInstalled, Parity, check_onnx, export_onnx, judge, onnx_parity  # noqa: E402
from emanet.errors import ConfigError, UserError  # noqa: E402
from emanet.models.emanet import ModelConfig  # noqa: E402
from emanet.pretrained import load_model, save_pretrained  # noqa: E402
from tests.conftest import calibrated, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _tiny(arch="emanet"):
    return calibrated(tiny_model(arch=arch))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _tiny()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "emanet.onnx", height=33, width=41)
    return model, path


def test_onnxruntime_matches_pytorch_at_other_sizes_and_batches(exported):
    model, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # neither the example's batch (2) nor its size (33x41): batch, height and width are really dynamic
    for shape in [(1, 3, 65, 81), (2, 3, 49, 57), (3, 3, 40, 40)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(["logits"], {"image": x.numpy()})
        assert got.shape == (shape[0], 3, shape[2], shape[3])
        assert np.abs(got - expected).max() < 1e-4


def test_check_onnx_passes_the_exported_model_and_catches_another(exported):
    model, path = exported
    sizes = ((1, 3, 45, 37), (2, 3, 33, 49))
    parity = onnx_parity(model, path, sizes)
    assert parity.max_abs_diff < 1e-4 and parity.label_agreement == 1.0 and parity.max_abs_logit > 1.0
    other = _tiny()
    with torch.no_grad():
        other.head.context.bases.copy_(torch.roll(other.head.context.bases, 1, dims=1))  # other EM bases
    assert check_onnx(other, path, sizes) > 1e-2


def test_graph_is_plain_onnx_with_the_em_iterations_unrolled(exported):
    _, path = exported
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert {"MatMul", "Softmax", "ReduceSum", "Div"} <= set(ops)
    assert ops.count("Softmax") == 3  # one E-step per EM stage (T = 3), nothing else in the model has a softmax
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}  # no custom operators
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["logits"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    # one self-contained file: no external weights
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in graph.initializer)
    assert sorted(p.name for p in path.parent.iterdir()) == ["emanet.onnx"]


def test_fcn_baseline_exports_and_the_callers_model_is_left_alone(tmp_path):
    model = _tiny("fcn").train()
    bn_before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    path = export_onnx(model, tmp_path / "fcn.onnx", height=33, width=33, fold_bn=True)
    assert model.training and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bn_before
    graph = onnx.load(str(path)).graph
    assert "Softmax" not in [n.op_type for n in graph.node]
    assert "BatchNormalization" not in [n.op_type for n in graph.node]  # folded into the convs
    assert check_onnx(model, path, sizes=((1, 3, 45, 37), (2, 3, 57, 65))) < 1e-4


def test_bad_opset_and_missing_packages_are_clear_errors(tmp_path, monkeypatch, capsys):
    model = _tiny("fcn")
    with pytest.raises(ConfigError, match="opset 5 is not supported"):
        export_onnx(model, tmp_path / "m.onnx", opset=5)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(OnnxNotInstalled, match=r"pip install 'emanet\[onnx\]'") as missing:
        export_onnx(model, tmp_path / "m.onnx")
    assert isinstance(missing.value, UserError) and isinstance(missing.value, ImportError)
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "ONNX export needs onnx: pip install 'emanet[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture
def model_folder(tmp_path):
    cfg = Config()
    cfg.model = ModelConfig(
        backbone="resnet18", backbone_width=8, channels=16, mid_channels=8, num_bases=4, num_classes=3, stem="standard"
    )
    cfg.data.dataset = "synthetic"
    return save_pretrained(_tiny(), cfg, tmp_path / "model", class_names=["bg", "a", "b"])


def test_cli_export_with_check(model_folder, tmp_path, capsys):
    out = tmp_path / "sub" / "m.onnx"
    rc = cli.main(
        [
            "export",
            str(model_folder),
            "--format",
            "onnx",
            "--out",
            str(out),
            "--size",
            "33",
            "41",
            "--check",
            "--fold-bn",
            "model.eval_stages=5",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "check (float32 onnxruntime vs PyTorch, random inputs (1, 3, 33, 41) and (2, 3, 32, 32))" in text
    assert "same argmax on 100.000% of pixels" in text and "of the largest |logit|" in text
    assert "check passed (>= 99.9% agreement, <= 0.02 relative)" in text
    proto = onnx.load(str(out))
    assert [n.op_type for n in proto.graph.node].count("Softmax") == 5  # the override's T_eval, unrolled
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["emanet.class_names"] == '["bg", "a", "b"]'
    assert meta["emanet.mean"] == "[0.485, 0.456, 0.406]"


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_python_export_of_a_loaded_model_writes_the_cli_metadata(model_folder, tmp_path, caplog):
    assert cli.main(["export", str(model_folder), "--out", str(tmp_path / "cli.onnx"), "--size", "33", "33"]) == 0
    loaded = load_model(model_folder)
    path = export_onnx(loaded, tmp_path / "py.onnx", height=33, width=33)
    meta = _metadata(path)
    assert meta == _metadata(tmp_path / "cli.onnx")
    assert json.loads(meta["emanet.std"]) == [0.229, 0.224, 0.225]
    assert json.loads(meta["emanet.palette"]) == [list(c) for c in loaded.palette]
    assert json.loads(meta["emanet.model_config"])["num_bases"] == 4
    # a bare module has no config to write: no emanet.* keys, and a warning that says so
    with caplog.at_level(logging.WARNING, logger="emanet.deploy.export"):
        bare = export_onnx(loaded.model, tmp_path / "bare.onnx", height=33, width=33, metadata={"mine": "1"})
    assert _metadata(bare) == {"mine": "1"} and "no emanet.* metadata" not in caplog.text  # metadata given
    with caplog.at_level(logging.WARNING, logger="emanet.deploy.export"):
        bare = export_onnx(loaded.model, tmp_path / "bare.onnx", height=33, width=33)
    assert _metadata(bare) == {} and "no emanet.* metadata" in caplog.text


def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "export.md").read_text(), flags=re.S)


def test_docs_python_snippets_run_and_the_file_runs_without_emanet(model_folder, tmp_path, monkeypatch):
    blocks = _doc_blocks()
    with_emanet = [b for b in blocks if re.search(r"^(from|import) emanet", b, flags=re.M)]
    plain = [b for b in blocks if b not in with_emanet]
    assert len(with_emanet) == 2 and len(plain) == 1
    (tmp_path / "models").mkdir()
    model_folder.rename(tmp_path / "models" / "emanet101-voc")  # the name the snippets load
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for i in range(4):  # for the int8 snippet: two to calibrate on, two held out
        rgb = np.random.default_rng(i).integers(0, 256, (33 + i, 41, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / "photos" / f"{i}.jpg")
    for code in with_emanet:
        exec(compile(code, "docs/export.md", "exec"), {})
    assert (tmp_path / "emanet.onnx").is_file() and (tmp_path / "emanet-int8.onnx").is_file()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)).save("photo.jpg")
    # in a fresh interpreter; no emanet module may have been imported by the snippet
    check = "\nimport sys\nassert not [m for m in sys.modules if m.startswith('emanet')], 'emanet imported'\n"
    proc = subprocess.run([sys.executable, "-c", plain[0] + check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    labels = Image.open("photo_labels.png")
    assert labels.mode == "P" and labels.size == (45, 37)


def _big_logits(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.head.classifier.weight.mul_(1e4)  # logits of ~1e5: float32 rounding alone moves them by > 1e-4
        model.head.classifier.bias.mul_(1e4)
    return model


def test_check_judges_the_difference_relative_to_the_logits_scale(tmp_path):
    model = _big_logits(_tiny())
    path = export_onnx(model, tmp_path / "big.onnx", height=33, width=41)
    parity = onnx_parity(model, path)
    assert parity.max_abs_diff > 1e-4 and parity.max_abs_logit > 1e3  # the old absolute bound would fail it
    assert parity.relative_diff < 1e-5 and judge(parity, min_agreement=0.999, rtol=0.02) == []
    wrong = Parity(max_abs_diff=5.0, max_abs_logit=10.0, label_agreement=0.9)
    assert judge(wrong, min_agreement=0.999, rtol=0.02) == [
        "the argmax agrees on 90.000% of pixels, below the required 99.9%",
        "the largest logit difference is 5.00e-01 of the largest |logit|, over the relative tolerance 0.02",
    ]
    assert judge(wrong, min_agreement=0.9, rtol=None) == []


def test_cli_check_passes_large_logits_and_fails_a_wrong_graph(model_folder, tmp_path, capsys, monkeypatch):
    loaded = load_model(model_folder)
    big = save_pretrained(_big_logits(loaded.model), loaded.config, tmp_path / "big", class_names=["bg", "a", "b"])
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(big), "--out", str(out), "--size", "33", "41", "--check"]) == 0
    assert "check passed" in capsys.readouterr().out
    earlier = out.read_bytes()

    def swapped_classes(net, *args, **kwargs):  # the graph of a model whose classes are swapped: genuinely wrong
        with torch.no_grad():
            net.head.classifier.weight.copy_(torch.roll(net.head.classifier.weight, 1, dims=0))
            net.head.classifier.bias.copy_(torch.roll(net.head.classifier.bias, 1, dims=0))
        return real(net, *args, **kwargs)

    real = export_mod._export_torchscript
    monkeypatch.setattr(export_mod, "_export_torchscript", swapped_classes)
    args = ["export", str(model_folder), "--out", str(out), "--overwrite", "--size", "33", "41", "--check"]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert f"{out}: check failed: the argmax agrees on" in captured.err and "nothing written" in captured.err
    assert "of the largest |logit|, over the relative tolerance 0.02" in captured.err
    # the failed file never replaced the earlier one, and no temporary is left
    assert out.read_bytes() == earlier and sorted(p.name for p in tmp_path.iterdir()) == ["big", "m.onnx", "model"]
    # the thresholds are the user's: a low enough bar passes even this graph
    args += ["--min-agreement", "0", "--rtol", "100"]
    assert cli.main(args) == 0 and out.read_bytes() != earlier


def test_cli_export_bad_size_and_missing_source(tmp_path, capsys):
    # the size is checked before anything is loaded
    assert cli.main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.onnx"), "--size", "0", "41"]) == 2
    assert "--size H W must be at least 32" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "model source not found" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    model = _tiny()
    path = export_onnx(model, tmp_path / "m.onnx", height=33, width=41, exporter="dynamo")
    assert {n.domain for n in onnx.load(str(path)).graph.node} <= {"", "ai.onnx"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no m.onnx.data
    assert check_onnx(model, path, sizes=((1, 3, 65, 81), (3, 3, 49, 57))) < 1e-4


def test_an_export_that_fails_keeps_the_earlier_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"an earlier export")

    def invalid(model, *args, **kwargs):  # what onnx's checker raises for a graph it refuses
        raise onnx.checker.ValidationError("Field 'shape' of 'type' is required but missing.")

    monkeypatch.setattr(onnx.checker, "check_model", invalid)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(_tiny("fcn"), path, height=33, width=33)
    # the checker read the temporary: the graph it refused never replaced the file, and no temporary is left
    assert path.read_bytes() == b"an earlier export" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
