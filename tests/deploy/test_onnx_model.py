"""emanet.deploy.onnx_model: an exported .onnx file as a model for Predictor, `emanet predict` and `emanet eval`,
with the PyTorch model's preprocessing and results (labels equal, probabilities within 1e-4)."""

from __future__ import annotations

import importlib.util
import json
import logging

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from emanet.cli.main import main  # noqa: E402
from emanet.config import Config  # noqa: E402
from emanet.deploy.export import export_onnx, model_metadata  # noqa: E402
from emanet.deploy.onnx_model import OnnxModel, is_onnx_file, load_onnx  # noqa: E402
from emanet.deploy.predict import Predictor  # noqa: E402
from emanet.errors import ConfigError, ModelSourceError, UserError  # noqa: E402
from emanet.pretrained import load_model, save_pretrained  # noqa: E402
from tests.conftest import calibrated, run_cli, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PALETTE = [(10, 20, 30), (200, 0, 0), (0, 200, 0)]
NAMES = ["sky", "road", "car"]
SLIDE = {"mode": "slide", "crop_size": (25, 25), "stride": (16, 16)}
PROB_TOL = 1e-4  # |onnxruntime - PyTorch| class probabilities; labels must be equal


def _config() -> Config:
    cfg = Config()
    cfg.model = tiny_model(eval_stages=2)  # T=2 at test time: the graph must run the model's eval T
    cfg.data.dataset = "synthetic"  # padded to 1 mod 8 (the default): the metadata must carry it
    cfg.data.options = {"length": 2, "val_length": 3, "image_size": 41, "max_objects": 4, "min_objects": 2}
    cfg.data.num_workers = 0
    return cfg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = _config()
    folder = tmp_path_factory.mktemp("model") / "m"
    return save_pretrained(calibrated(cfg.model), cfg, folder, class_names=NAMES, palette=PALETTE)


@pytest.fixture(scope="module")
def onnx_file(model_dir):
    path = model_dir.parent / "m.onnx"
    assert main(["export", str(model_dir), "--out", str(path), "--size", "33", "41"]) == 0
    return path


@pytest.fixture(scope="module")
def static_file(model_dir):
    """Exported with dynamic=False: (1, 3, 25, 25), as the sliding window's crop."""
    loaded = load_model(model_dir)
    meta = model_metadata(loaded.config, loaded.class_names, loaded.palette)
    path = model_dir.parent / "static.onnx"
    return export_onnx(loaded.model, path, height=25, width=25, dynamic=False, metadata=meta)


def _images(n: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (30 + 3 * i, 37, 3), dtype=np.uint8) for i in range(n)]


def test_metadata_gives_back_the_config_class_names_and_palette(model_dir, onnx_file):
    loaded = load_model(model_dir)
    model = OnnxModel(onnx_file)
    assert model.config == loaded.config
    assert model.class_names == NAMES and model.palette == PALETTE
    assert model.stages == 2 and model.input_shape == (None, 3, None, None)
    assert is_onnx_file(onnx_file) and is_onnx_file("x/M.ONNX") and not is_onnx_file(model_dir)


def test_an_older_export_without_the_whole_config_keeps_model_and_normalisation(model_dir, tmp_path, caplog):
    loaded = load_model(model_dir)
    meta = model_metadata(loaded.config, loaded.class_names, loaded.palette)
    del meta["emanet.config"]
    old = export_onnx(loaded.model, tmp_path / "old.onnx", height=33, width=33, metadata=meta)
    with caplog.at_level(logging.WARNING):
        model = OnnxModel(old)
    assert "no emanet.config" in caplog.text and str(old) in caplog.text
    assert model.config.model == loaded.config.model
    assert (model.config.data.mean, model.config.data.std) == (loaded.config.data.mean, loaded.config.data.std)
    assert model.class_names == NAMES


@pytest.mark.parametrize("options", [{}, {**SLIDE, "flip": True, "scales": (0.75, 1.0)}], ids=["whole", "slide"])
def test_predictor_from_onnx_equals_the_pytorch_model(model_dir, onnx_file, options):
    torch_pred = Predictor.from_source(model_dir, device="cpu", **options)
    onnx_pred = Predictor.from_source(onnx_file, batch_size=2, **options)
    assert isinstance(onnx_pred.model, OnnxModel) and onnx_pred.device.type == "cpu"
    images = _images(3)
    for a, b in zip(torch_pred.predict_batch(images, probs=True), onnx_pred.predict_batch(images, probs=True)):
        assert b.padded_size == a.padded_size and a.padded_size[1] == 41  # the file's config: 1 mod 8
        np.testing.assert_array_equal(b.labels, a.labels)
        assert np.abs(b.probs - a.probs).max() < PROB_TOL
        assert b.palette[:3] == PALETTE


def test_an_int8_graph_runs_the_same_way(onnx_file, tmp_path):
    """int8 graphs (here onnxruntime's dynamic quantization) take and give float32: the same path runs them."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = tmp_path / "int8.onnx"
    quantize_dynamic(str(onnx_file), str(int8), weight_type=QuantType.QInt8)  # keeps the metadata
    images = _images()
    for options in ({}, SLIDE):
        floats = Predictor.from_source(onnx_file, **options).predict_batch(images, probs=True)
        ints = Predictor.from_source(int8, **options).predict_batch(images, probs=True)
        for a, b in zip(floats, ints):
            assert (b.labels == a.labels).mean() >= 0.95  # quantization error, not a different pipeline
            assert np.abs(b.probs - a.probs).max() < 0.2


def test_a_static_export_runs_its_window_size_and_names_the_file_otherwise(model_dir, static_file):
    torch_pred = Predictor.from_source(model_dir, device="cpu", **SLIDE)
    onnx_pred = Predictor.from_source(static_file, batch_size=2, **SLIDE)  # a fixed batch of 1: image by image
    for a, b in zip(torch_pred.predict_batch(_images(), probs=True), onnx_pred.predict_batch(_images(), probs=True)):
        np.testing.assert_array_equal(b.labels, a.labels)
        assert np.abs(b.probs - a.probs).max() < PROB_TOL
    with pytest.raises(ConfigError, match=r"static\.onnx.*fixed input size 25x25.*got 33x41"):
        Predictor.from_source(static_file)(_images(1)[0])


def test_settings_the_graph_cannot_honour_are_refused_naming_the_file(onnx_file):
    predictor = Predictor.from_source(onnx_file)
    with pytest.raises(ConfigError, match=r"m\.onnx: attention maps are not in an ONNX graph"):
        predictor(_images(1)[0], attention=True)
    for options, what in [
        ({"eval_stages": 5}, "T=2 EM stages, fixed at export"),
        ({"precision": "bf16"}, "precision bf16 cannot apply"),
        ({"compile": True}, "compile cannot apply"),
        ({"device": "cuda"}, "device cuda cannot apply"),
    ]:
        with pytest.raises(ConfigError, match=rf"m\.onnx: .*{what}"):
            Predictor.from_source(onnx_file, **options)
    Predictor.from_source(onnx_file, eval_stages=2)  # the graph's own T is fine
    with pytest.raises(ConfigError, match=r"m\.onnx: the model is fixed in the ONNX graph, model\.num_bases=8"):
        load_onnx(onnx_file, overrides=["model.num_bases=8"])


def test_a_saved_eval_stages_the_graph_does_not_hold_is_dropped_with_a_warning(model_dir, tmp_path, caplog):
    loaded = load_model(model_dir)
    loaded.config.eval.eval_stages = 5  # a training config's T_eval; export bakes the model's T=2
    meta = model_metadata(loaded.config, loaded.class_names, loaded.palette)
    path = export_onnx(loaded.model, tmp_path / "t5.onnx", height=33, width=33, metadata=meta)
    with caplog.at_level(logging.WARNING):
        cfg = load_onnx(path).config
    assert cfg.eval.eval_stages is None and "eval.eval_stages=5 is not in the graph" in caplog.text


def test_overrides_and_a_config_file_keep_the_graphs_model(model_dir, onnx_file):
    loaded = load_onnx(onnx_file, overrides=["eval.mode=slide", "eval.crop_size=[25,25]", "eval.stride=[16,16]"])
    assert loaded.config.eval.mode == "slide" and loaded.source == onnx_file
    other = Config()  # e.g. `emanet eval model.onnx --config voc_reference`: data/eval from it, the model the graph's
    other.eval.flip = True
    loaded = load_onnx(onnx_file, config=other)
    assert loaded.config.model == load_model(model_dir).config.model
    assert loaded.config.eval.flip and loaded.config.data.dataset == "voc"


def test_bad_files_are_model_source_errors_naming_the_file(model_dir, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx graph")
    with pytest.raises(ModelSourceError, match=r"garbage\.onnx: not a readable ONNX file"):
        OnnxModel(garbage)
    bare = export_onnx(load_model(model_dir).model, tmp_path / "bare.onnx", height=33, width=33)  # no metadata
    with pytest.raises(ModelSourceError, match=r"bare\.onnx: no emanet metadata"):
        OnnxModel(bare)
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx"):
        OnnxModel(tmp_path / "missing.onnx")


def test_without_onnxruntime_the_error_names_the_extra(onnx_file, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ImportError, match=r"onnxruntime.*pip install 'emanet\[onnx\]'") as missing:
        Predictor.from_source(onnx_file)
    assert isinstance(missing.value, UserError)
    assert main(["predict", str(onnx_file), str(onnx_file), "--out", str(tmp_path / "out")]) == 2
    assert "emanet[onnx]" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the command line, in a subprocess


def test_cli_predict_from_onnx_writes_the_labels_of_the_pytorch_model(model_dir, onnx_file, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(_images()):
        Image.fromarray(image).save(folder / f"im{i}.png")
    done = run_cli("predict", str(onnx_file), str(folder), "--out", str(tmp_path / "onnx"), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "2 of 2 images predicted" in done.stdout
    argv = ["predict", str(model_dir), str(folder), "--out", str(tmp_path / "torch"), "--no-progress"]
    assert main([*argv, "--device", "cpu"]) == 0
    for i in range(2):
        for suffix in (".png", "_color.png", "_overlay.png"):
            assert (tmp_path / "onnx" / f"im{i}{suffix}").is_file()
        got = np.asarray(Image.open(tmp_path / "onnx" / f"im{i}.png"))
        np.testing.assert_array_equal(got, np.asarray(Image.open(tmp_path / "torch" / f"im{i}.png")))


@pytest.mark.parametrize("subprocess", [True, False], ids=["slide-subprocess", "whole"])
def test_cli_eval_of_onnx_gives_the_pytorch_miou(model_dir, onnx_file, tmp_path, subprocess):
    mode = ["eval.mode=slide", "eval.crop_size=[25,25]", "eval.stride=[16,16]"] if subprocess else []
    argv = ["eval", str(onnx_file), *mode, "--no-progress", "--out", str(tmp_path / "onnx.json")]
    if subprocess:
        done = run_cli(*argv)
        assert done.returncode == 0, done.stderr
    else:
        assert main(argv) == 0
    assert main(["eval", str(model_dir), *mode, "--no-progress", "--out", str(tmp_path / "torch.json")]) == 0
    got, expected = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("onnx", "torch"))
    assert got["images"] == expected["images"] == 3 and got["source"] == str(onnx_file)
    assert got["eval"]["mode"] == ("slide" if subprocess else "whole")
    assert abs(got["mIoU"] - expected["mIoU"]) < 1e-6
    assert got["confusion_matrix"] == expected["confusion_matrix"]


def test_cli_bad_onnx_files_exit_2_naming_the_file(model_dir, tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx graph")
    Image.fromarray(_images(1)[0]).save(tmp_path / "im.png")
    done = run_cli("predict", str(garbage), str(tmp_path / "im.png"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and f"{garbage}: not a readable ONNX file" in done.stderr
    assert "Traceback" not in done.stderr
    bare = export_onnx(load_model(model_dir).model, tmp_path / "bare.onnx", height=33, width=33)
    assert main(["eval", str(bare), "--no-progress"]) == 2
    assert f"{bare}: no emanet metadata" in capsys.readouterr().err
