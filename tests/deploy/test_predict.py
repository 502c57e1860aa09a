"""emanet.deploy.predict: Predictor (preprocessing as in evaluation, batching, EXIF); `emanet predict` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from emanet.cli import main as cli
from emanet.config import Config
from emanet.data.base import read_image
from emanet.deploy.predict import Predictor
from emanet.inference import infer
from emanet.models.emanet import ModelConfig
from emanet.pretrained import save_pretrained
from tests.conftest import calibrated

PALETTE = [(10, 20, 30), (200, 0, 0), (0, 200, 0)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _config() -> Config:
    cfg = Config()
    cfg.model = ModelConfig(
        backbone="resnet18", backbone_width=8, channels=16, mid_channels=8, num_bases=4, num_classes=3, stem="standard"
    )
    cfg.data.dataset = "synthetic"
    return cfg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = _config()
    return save_pretrained(calibrated(cfg.model), cfg, tmp_path_factory.mktemp("model") / "m", palette=PALETTE)


@pytest.fixture(scope="module")
def predictor(model_dir):
    return Predictor.from_source(model_dir, device="cpu")


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reference_input(image: np.ndarray, cfg: Config) -> torch.Tensor:
    """Independent preprocessing: normalise, pad bottom/right with 0 to 1 mod 8; (1, 3, Hp, Wp)."""
    h, w = image.shape[:2]
    hp, wp = h + (1 - h) % 8, w + (1 - w) % 8
    mean, std = np.array(cfg.data.mean), np.array(cfg.data.std)
    padded = np.zeros((hp, wp, 3), np.float32)
    padded[:h, :w] = (image / 255.0 - mean) / std
    return torch.from_numpy(padded.transpose(2, 0, 1).copy())[None]


@pytest.mark.parametrize(
    "options",
    [{}, {"mode": "slide", "crop_size": (25, 25), "stride": (16, 16), "flip": True, "scales": (0.75, 1.0)}],
    ids=["whole", "slide-flip-ms"],
)
def test_labels_are_argmax_of_infer_on_the_padded_image_cropped(model_dir, options):
    pred_api = Predictor.from_source(model_dir, device="cpu", **options)
    image = _image(30, 37, seed=1)
    got = pred_api(image, probs=True)

    x = _reference_input(image, pred_api.config)
    assert x.shape[-2:] == (33, 41)
    kw = {k: options[k] for k in ("mode", "crop_size", "stride", "flip", "scales") if k in options}
    probs = infer(pred_api.model, x, align_corners=True, **kw)[0, :, :30, :37]  # (C, H, W)
    assert got.labels.shape == (30, 37) and got.labels.dtype == np.uint8
    assert got.probs.shape == (3, 30, 37) and got.probs.dtype == np.float32
    # the two preprocessings differ by float32 rounding (~5e-7), which the network amplifies a little
    np.testing.assert_allclose(got.probs, probs.numpy(), atol=1e-5)
    np.testing.assert_array_equal(got.labels, probs.argmax(0).numpy())
    assert got.padded_size == (33, 41)


def test_batches_of_mixed_sizes_equal_single_predictions(model_dir):
    single = Predictor.from_source(model_dir, device="cpu")
    batched = Predictor.from_source(model_dir, device="cpu", batch_size=2)
    images = [_image(30, 37, 1), _image(20, 20, 2), _image(33, 41, 3), _image(31, 40, 4)]
    together = batched.predict_batch(images, probs=True)
    assert [p.labels.shape for p in together] == [(30, 37), (20, 20), (33, 41), (31, 40)]
    for image, pred in zip(images, together):
        alone = single(image, probs=True)
        np.testing.assert_allclose(pred.probs, alone.probs, atol=1e-5)
        np.testing.assert_array_equal(pred.labels, alone.labels)


def test_path_pil_and_array_inputs_agree(predictor, tmp_path):
    image = _image(33, 41, 5)
    Image.fromarray(image).save(tmp_path / "x.png")
    by_path = predictor(tmp_path / "x.png").labels
    np.testing.assert_array_equal(by_path, predictor(image).labels)
    np.testing.assert_array_equal(by_path, predictor(Image.open(tmp_path / "x.png")).labels)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        predictor(image[..., 0])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        predictor(image.astype(np.float32))


def test_exif_orientation_is_applied_once(predictor, tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: stored pixels must be turned 90 degrees clockwise to display
    Image.fromarray(_image(30, 37, 6)).save(path, exif=exif, quality=95)
    stored = np.array(Image.open(path).convert("RGB"))  # (30, 37, 3), as decoded, no EXIF applied
    upright = np.ascontiguousarray(np.rot90(stored, k=-1))  # (37, 30, 3) clockwise

    labels = predictor(path).labels
    assert labels.shape == (37, 30)
    np.testing.assert_array_equal(labels, predictor(upright).labels)
    np.testing.assert_array_equal(labels, predictor(Image.open(path)).labels)
    # the CLI reads with read_image and hands the (already turned) image on: it must not turn it again
    np.testing.assert_array_equal(labels, predictor(read_image(path)).labels)


def test_cli_writes_outputs_skips_a_corrupt_file_and_exits_1(model_dir, predictor, tmp_path, capsys, caplog):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    a, b = _image(30, 37, 7), _image(33, 41, 8)
    Image.fromarray(a).save(src / "a.png")
    Image.fromarray(b).save(src / "sub" / "b.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    out = tmp_path / "out"

    rc = cli.main(["predict", str(model_dir), str(src), "--out", str(out), "--batch-size", "2", "--no-progress"])
    err = capsys.readouterr().err + caplog.text  # the skipped file is a logged warning
    assert rc == 1
    assert "broken.jpg" in err and "cannot read image" in err
    assert not list(out.rglob("broken*"))
    for name, image in (("a", a), ("sub/b", b)):
        index = Image.open(out / f"{name}.png")
        assert index.mode == "P" and index.size == (image.shape[1], image.shape[0])
        assert index.getpalette()[:9] == [v for rgb in PALETTE for v in rgb]
        labels = np.array(index)
        np.testing.assert_array_equal(labels, predictor(image).labels)  # palette PNG keeps the indices
        colour = np.array(Image.open(out / f"{name}_color.png"))
        np.testing.assert_array_equal(colour, np.array(PALETTE, np.uint8)[labels])
        overlay = np.array(Image.open(out / f"{name}_overlay.png")).astype(float)
        np.testing.assert_allclose(overlay, 0.5 * image + 0.5 * colour, atol=0.51)


def test_cli_glob_options_and_exit_0(model_dir, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    Image.fromarray(_image(30, 37, 9)).save(tmp_path / "d" / "x.png")
    Image.fromarray(_image(30, 37, 9)).save(tmp_path / "d" / "skip.jpg")
    out = tmp_path / "out"
    rc = cli.main(
        [
            "predict",
            str(model_dir),
            "--out",
            str(out),
            str(tmp_path / "d" / "*.png"),
            "--mode",
            "slide",
            "--crop-size",
            "25",
            "--stride",
            "16",
            "--flip",
            "--eval-stages",
            "2",
            "--alpha",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["x.png", "x_color.png", "x_overlay.png"]
    # alpha 1: the overlay is the colour image
    assert np.array_equal(np.array(Image.open(out / "x_overlay.png")), np.array(Image.open(out / "x_color.png")))


def test_cli_user_errors_exit_2(model_dir, tmp_path, capsys, caplog):
    assert cli.main(["predict", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "model source not found" in capsys.readouterr().err
    args = ["predict", str(model_dir), str(tmp_path), "--out", str(tmp_path / "o"), "--mode", "slide"]
    assert cli.main(args) == 2
    assert "crop_size" in capsys.readouterr().err
    assert cli.main(["predict", str(model_dir), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]) == 1
    assert "missing.png: no such file" in capsys.readouterr().err + caplog.text
