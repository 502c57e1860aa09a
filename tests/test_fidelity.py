"""End to end: a converted checkpoint through ``Predictor`` / ``emanet predict`` gives what its own toolkit gives.

Each source pipeline (preprocessing, padding, forward, resize, sliding window) is re-implemented here from
the source's code: the authors' dataset.py ``fetch`` + ``pad_inf`` + network.py + eval.py, and mmsegmentation
1.x's ``SegDataPreProcessor`` + ``EncoderDecoder.slide_inference`` / ``whole_inference``. The networks are the
functional re-implementations of tests/test_convert.py, fed the source state dicts (random weights, tiny widths).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from emanet.convert import convert
from emanet.data.transforms import eval_transform
from emanet.engine import evaluate
from emanet.predict import Predictor
from emanet.pretrained import load_model
from test_convert import mmseg_forward, mmseg_state, reference_forward, reference_state

FIXTURES = Path(__file__).parent / "fixtures" / "mmseg_configs"
MMSEG_769 = (FIXTURES / "mmengine_emanet_r50-d8_4xb2-80k_cityscapes-769x769.txt").read_text()
MMSEG_512 = (FIXTURES / "mmengine_emanet_r50-d8_4xb2-80k_cityscapes-512x1024.txt").read_text()
MMCV_769 = (FIXTURES / "mmcv_emanet_r50-d8_769x769_80k_cityscapes.txt").read_text()
SIZES = [(45, 61), (38, 53)]  # odd sizes, neither 1 mod 8

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """A uint8 RGB image with structure (smooth blobs) and noise, so that labels are not all one class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * yy + c) * np.cos(5 * xx - c) for c in range(3)], axis=-1)
    return np.clip(127 + 100 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- the authors' pipeline


def reference_pipeline(sd: dict, image: np.ndarray, *, divide_by_mean: bool = False) -> torch.Tensor:
    """XiaLiPKU/EMANet eval: fetch() -> pad_inf() -> EMANet -> argmax; padded label pixels are ignored, so the
    prediction counts on the image's own pixels. Returns probabilities (C, H, W)."""
    mean = torch.Tensor(np.array([0.485, 0.456, 0.406]))  # settings.MEAN / STD
    std = mean if divide_by_mean else torch.Tensor(np.array([0.229, 0.224, 0.225]))
    x = torch.FloatTensor(np.array(Image.fromarray(image).convert("RGB"))) / 255
    x = ((x - mean) / std).permute(2, 0, 1).unsqueeze(0)
    h, w = x.shape[-2:]
    stride = 8  # settings.STRIDE
    pad_h, pad_w = (stride + 1 - h % stride) % stride, (stride + 1 - w % stride) % stride
    x = F.pad(x, (0, pad_w, 0, pad_h), mode="constant", value=0.0)
    with torch.no_grad():
        logits = reference_forward(sd, x)  # upsampled to the padded size, align_corners=True
    return torch.softmax(logits, 1)[0, :, :h, :w]


# ----------------------------------------------------------------------------- mmsegmentation 1.x


def mmseg_pipeline(sd: dict, image: np.ndarray, *, mode: str, align_corners: bool, crop=None, stride=None):
    """LoadImageFromFile (BGR) -> SegDataPreProcessor (bgr_to_rgb, (x - mean) / std, no test padding: it has no
    test_cfg) -> slide/whole inference -> postprocess (no padding, no resize) -> softmax. (C, H, W)."""
    bgr = torch.from_numpy(image[..., ::-1].copy()).permute(2, 0, 1)  # what cv2.imread gives, as (3, H, W)
    x = bgr[[2, 1, 0], ...].float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    x = ((x - mean) / std)[None]

    def encode_decode(img):
        return mmseg_forward(sd, img, align_corners=align_corners)  # resized to the window with align_corners

    with torch.no_grad():
        if mode == "whole":
            logits = encode_decode(x)
        else:
            (hc, wc), (hs, ws) = crop, stride
            _, _, h, w = x.shape
            preds, count = 0, torch.zeros(1, 1, h, w)
            for i in range(max(h - hc + hs - 1, 0) // hs + 1):
                for j in range(max(w - wc + ws - 1, 0) // ws + 1):
                    y2, x2 = min(i * hs + hc, h), min(j * ws + wc, w)
                    y1, x1 = max(y2 - hc, 0), max(x2 - wc, 0)
                    preds = preds + F.pad(encode_decode(x[:, :, y1:y2, x1:x2]), (x1, w - x2, y1, h - y2))
                    count[:, :, y1:y2, x1:x2] += 1
            logits = preds / count
    return torch.softmax(logits, 1)[0]


# ----------------------------------------------------------------------------- agreement


def _agree(got, want_probs: torch.Tensor) -> tuple[float, float]:
    """(share of equal labels, max |probability difference|)."""
    want = want_probs.numpy()
    return float((got.labels == want.argmax(0)).mean()), float(np.abs(got.probs - want).max())


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory):
    sd = reference_state(seed=11)
    folder = tmp_path_factory.mktemp("ref")
    torch.save({"net": sd, "step": 30000}, folder / "final.pth")
    convert(folder / "final.pth", folder / "model", "reference")
    return sd, folder / "model"


def _mmseg_model(tmp_path_factory, text: str, name: str):
    sd = mmseg_state(seed=12)
    folder = tmp_path_factory.mktemp(name)
    torch.save({"state_dict": sd, "meta": {"cfg": text}}, folder / "iter_80000.pth")
    result = convert(folder / "iter_80000.pth", folder / "model", "mmseg")
    return sd, folder / "model", result


@pytest.mark.parametrize("size", SIZES)
def test_reference_model_through_predictor_is_the_authors_pipeline(reference_model, size):
    sd, folder = reference_model
    predictor = Predictor.from_source(folder, device="cpu")
    image = _image(*size, seed=size[0])
    got = predictor(image, probs=True)
    labels, probs = _agree(got, reference_pipeline(sd, image))
    assert labels >= 0.999 and probs <= 1e-3, (labels, probs)
    # the first release's normalisation is a different pipeline: a test that could fail
    old_labels, old_probs = _agree(got, reference_pipeline(sd, image, divide_by_mean=True))
    assert old_probs > 1e-2


def test_first_release_reference_model_with_its_override(tmp_path):
    sd = reference_state(seed=13)
    torch.save({"net": sd}, tmp_path / "final.pth")
    convert(tmp_path / "final.pth", tmp_path / "model", "reference", overrides=["data.std=[0.485,0.456,0.406]"])
    image = _image(45, 61, seed=4)
    got = Predictor.from_source(tmp_path / "model", device="cpu")(image, probs=True)
    labels, probs = _agree(got, reference_pipeline(sd, image, divide_by_mean=True))
    assert labels >= 0.999 and probs <= 1e-3, (labels, probs)


@pytest.fixture(scope="module")
def mmseg_769(tmp_path_factory):
    return _mmseg_model(tmp_path_factory, MMSEG_769, "mm769")


def test_mmseg_769_converts_with_its_test_settings(mmseg_769, tmp_path_factory):
    _, folder, result = mmseg_769
    cfg = result.config
    assert cfg.model.align_corners is True
    assert (cfg.eval.mode, cfg.eval.crop_size, cfg.eval.stride) == ("slide", [769, 769], [513, 513])
    assert cfg.data.eval_pad_multiple == 0
    assert any("2049, 1025" in n and "not reproduced" in n for n in result.notes)  # the test Resize, said
    # the mmcv (mmseg 0.x) text of the same config says the same
    old = _mmseg_model(tmp_path_factory, MMCV_769, "mmcv769")[2].config
    assert (old.model.align_corners, old.eval.mode, old.eval.crop_size, old.eval.stride) == (
        True,
        "slide",
        [769, 769],
        [513, 513],
    )


@pytest.mark.parametrize(
    "size, crop, stride",
    [
        ((45, 61), None, None),  # the real 769/513 windows: one window, clipped to the image
        ((45, 61), (33, 41), (21, 27)),  # several windows on both axes
        ((38, 53), (49, 41), (32, 27)),  # taller than the image: clipped in H, slides in W
    ],
)
def test_mmseg_769_model_through_predictor_is_mmsegs_pipeline(mmseg_769, size, crop, stride):
    sd, folder, _ = mmseg_769
    options = {} if crop is None else {"crop_size": crop, "stride": stride}
    predictor = Predictor.from_source(folder, device="cpu", **options)
    image = _image(*size, seed=size[1])
    got = predictor(image, probs=True)
    want = mmseg_pipeline(
        sd, image, mode="slide", align_corners=True, crop=crop or (769, 769), stride=stride or (513, 513)
    )
    labels, probs = _agree(got, want)
    assert labels >= 0.999 and probs <= 1e-3, (labels, probs)


def test_mmseg_512x1024_model_runs_whole_without_align_corners(tmp_path_factory):
    sd, folder, result = _mmseg_model(tmp_path_factory, MMSEG_512, "mm512")
    assert result.config.model.align_corners is False and result.config.eval.mode == "whole"
    image = _image(38, 53, seed=7)
    got = Predictor.from_source(folder, device="cpu")(image, probs=True)
    labels, probs = _agree(got, mmseg_pipeline(sd, image, mode="whole", align_corners=False))
    assert labels >= 0.999 and probs <= 1e-3, (labels, probs)


def test_emanet_predict_cli_gives_the_authors_labels(reference_model, tmp_path):
    sd, folder = reference_model
    image = _image(45, 61, seed=9)
    Image.fromarray(image).save(tmp_path / "img.png")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "emanet",
            "predict",
            str(folder),
            str(tmp_path / "img.png"),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    labels = np.asarray(Image.open(tmp_path / "out" / "img.png"))
    want = reference_pipeline(sd, image).argmax(0).numpy()
    assert labels.shape == want.shape and (labels == want).mean() >= 0.999


@pytest.mark.parametrize("source", ["reference", "mmseg"])
def test_emanet_eval_scores_the_source_pipelines_labels_as_all_correct(reference_model, mmseg_769, source):
    """``engine.evaluate`` on the converted model's own eval transform: the source pipeline's labels as ground
    truth (the padding ignored) score aAcc >= 99.9%."""
    if source == "reference":
        sd, folder = reference_model
        truth = [reference_pipeline(sd, _image(*s, seed=s[0])) for s in SIZES]
    else:
        sd, folder, _ = mmseg_769
        truth = [
            mmseg_pipeline(
                sd, _image(*s, seed=s[0]), mode="slide", align_corners=True, crop=(769, 769), stride=(513, 513)
            )
            for s in SIZES
        ]
    loaded = load_model(folder)
    d = loaded.config.data
    transform = eval_transform(
        mean=d.mean, std=d.std, pad_multiple=d.eval_pad_multiple or None, pad_offset=d.eval_pad_offset
    )
    dataset = [
        transform(Image.fromarray(_image(*s, seed=s[0])), p.argmax(0).numpy().astype(np.uint8))
        for s, p in zip(SIZES, truth)
    ]
    results = evaluate(loaded.model, dataset, loaded.config, torch.device("cpu"))
    assert results["images"] == 2 and results["aAcc"] >= 0.999, results["aAcc"]
