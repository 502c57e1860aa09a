import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from emanet.cli import main as cli  # noqa: E402
from emanet.config import Config  # noqa: E402
from emanet.deploy.export import OnnxNotInstalled, check_onnx, export_onnx, onnx_parity  # noqa: E402
from emanet.errors import ConfigError, UserError  # noqa: E402
from emanet.models.emanet import ModelConfig, build_model  # noqa: E402
from emanet.pretrained import save_pretrained  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402


def _tiny(arch="emanet"):
    torch.manual_seed(0)
    model = build_model(tiny_model(arch=arch))
    model.train()
    with torch.no_grad():  # move BN statistics and the EM bases away from their initial values
        model(torch.randn(2, 3, 33, 33))
    return model.eval()


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
    assert "check: max |onnxruntime - pytorch| logits" in text and "same argmax on 100.000% of pixels" in text
    assert ": ok (tolerance 0.0001)" in text
    proto = onnx.load(str(out))
    assert [n.op_type for n in proto.graph.node].count("Softmax") == 5  # the override's T_eval, unrolled
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["emanet.class_names"] == '["bg", "a", "b"]'
    assert meta["emanet.mean"] == "[0.485, 0.456, 0.406]"


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
