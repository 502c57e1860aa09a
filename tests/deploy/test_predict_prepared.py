"""Predictor, `emanet predict` and `emanet eval` run the prepared model (BatchNorm folded, channels_last) by
default, with the same results as the eager model; --no-prepare opts out, --compile opts in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from emanet.cli.main import main
from emanet.config import Config
from emanet.deploy.predict import Predictor
from emanet.models.emanet import build_model
from emanet.pretrained import save_pretrained
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _config() -> Config:
    cfg = Config()
    cfg.model = tiny_model(stem="deep", aux=True)
    cfg.data.dataset = "synthetic"
    cfg.data.options = {"length": 4, "val_length": 3, "image_size": 41, "max_objects": 4, "min_objects": 2}
    cfg.data.num_workers = 0
    return cfg


def _trained_looking(cfg: Config) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    with torch.no_grad():  # BN statistics and bases away from their initial values
        for _ in range(3):
            model(torch.randn(2, 3, 41, 41))
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = _config()
    return save_pretrained(_trained_looking(cfg), cfg, tmp_path_factory.mktemp("model") / "m")


def _images(n: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (30 + 3 * i, 37, 3), dtype=np.uint8) for i in range(n)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_default_predictor_is_prepared_and_agrees_with_the_eager_model(model_dir, precision):
    fast = Predictor.from_source(model_dir, device="cpu", precision=precision)
    eager = Predictor.from_source(model_dir, device="cpu", precision=precision, prepare=False)
    assert fast.prepared and not any(isinstance(m, nn.BatchNorm2d) for m in fast.model.modules())
    assert not eager.prepared and any(isinstance(m, nn.BatchNorm2d) for m in eager.model.modules())
    tol = 1e-5 if precision == "fp32" else 5e-2  # bf16: the two round differently (folded weights)
    for a, b in zip(fast.predict_batch(_images(), probs=True), eager.predict_batch(_images(), probs=True)):
        np.testing.assert_allclose(a.probs, b.probs, atol=tol)
        if precision == "fp32":
            np.testing.assert_array_equal(a.labels, b.labels)


def test_labels_only_skip_the_softmax_and_equal_the_argmax_of_the_logits(model_dir, monkeypatch):
    predictor = Predictor.from_source(model_dir, device="cpu")
    image = _images(1)[0]
    class_softmaxes, real = [], torch.softmax  # over (B, C, H, W) class scores; the EM's are 2-D/3-D

    def spy(t, *args, **kwargs):
        class_softmaxes.extend([t.shape] if t.dim() == 4 else [])
        return real(t, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", spy)
    labels = predictor(image).labels
    assert class_softmaxes == []  # one whole-image pass, no probabilities asked: logits -> argmax
    with_probs = predictor(image, probs=True)
    assert len(class_softmaxes) == 1
    np.testing.assert_array_equal(labels, with_probs.labels)
    np.testing.assert_array_equal(labels, with_probs.probs.argmax(0))
    x = predictor.preprocess(image)[1][None]
    with torch.inference_mode():
        logits = predictor.model(x)[0, :, : image.shape[0], : image.shape[1]]
    np.testing.assert_array_equal(labels, logits.argmax(0).numpy())


def test_the_callers_model_is_left_as_it_was():
    cfg = _config()
    model = _trained_looking(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predictor = Predictor(model, cfg, device="cpu")
    predictor(_images(1)[0])
    assert predictor.model is not model
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for n, p in model.named_parameters() if "conv_in" not in n)


def test_attention_maps_come_from_the_prepared_model(model_dir):
    fast = Predictor.from_source(model_dir, device="cpu")
    eager = Predictor.from_source(model_dir, device="cpu", prepare=False)
    image = _images(1)[0]
    a, b = fast(image, attention=True).attention, eager(image, attention=True).attention
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_cli_predict_default_and_no_prepare_write_the_same_labels(model_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(_images(2)):
        Image.fromarray(image).save(folder / f"im{i}.png")
    for out, flags in (("fast", []), ("eager", ["--no-prepare"])):
        assert (
            main(
                [
                    "predict",
                    str(model_dir),
                    str(folder),
                    "--out",
                    str(tmp_path / out),
                    "--no-progress",
                    "--device",
                    "cpu",
                    *flags,
                ]
            )
            == 0
        )
    for i in range(2):
        fast = np.asarray(Image.open(tmp_path / "fast" / f"im{i}.png"))
        eager = np.asarray(Image.open(tmp_path / "eager" / f"im{i}.png"))
        np.testing.assert_array_equal(fast, eager)


def test_cli_eval_prepared_equals_no_prepare(model_dir, tmp_path):
    results = {}
    for name, flags in (("fast", []), ("eager", ["--no-prepare"])):
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(model_dir), "--no-progress", "--device", "cpu", "--out", str(out), *flags]) == 0
        results[name] = json.loads(out.read_text())
    assert results["fast"]["images"] == 3
    for key in ("mIoU", "aAcc", "IoU"):
        assert results["fast"][key] == results["eager"][key]


@pytest.mark.slow
@pytest.mark.skipif("'slow' not in config.getoption('markexpr')", reason="a cold compile, ~60 s: run with -m slow")
def test_cli_predict_compile_writes_the_same_labels(model_dir, tmp_path):
    # the one compile test: a cold torch.compile of the tiny model (61 s measured on the shared 2-core CPU)
    image = _images(1)[0]
    Image.fromarray(image).save(tmp_path / "im.png")
    for out, flags in (("fast", []), ("compiled", ["--compile"])):
        assert (
            main(
                [
                    "predict",
                    str(model_dir),
                    str(tmp_path / "im.png"),
                    "--out",
                    str(tmp_path / out),
                    "--no-progress",
                    "--device",
                    "cpu",
                    *flags,
                ]
            )
            == 0
        )
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "fast" / "im.png")), np.asarray(Image.open(tmp_path / "compiled" / "im.png"))
    )
