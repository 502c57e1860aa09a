"""End to end: a converted checkpoint through ``Predictor`` / ``emanet predict`` gives what its own toolkit gives.

Each source pipeline (preprocessing, padding, forward, resize, sliding window) is re-implemented here from
the source's code: the authors' dataset.py ``fetch`` + ``pad_inf`` + network.py + eval.py, and mmsegmentation
1.x's ``SegDataPreProcessor`` + ``EncoderDecoder.slide_inference`` / ``whole_inference``. The networks are the
functional re-implementations of tests/convert/test_checkpoints.py,
fed the source state dicts (random weights, tiny widths).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from emanet.config import load_config
from emanet.convert.checkpoints import convert
from emanet.data.transforms import keep_ratio_size
from emanet.deploy.predict import Predictor
from tests.convert.test_checkpoints import mmseg_forward, mmseg_state, reference_forward, reference_state

FIXTURES = Path(__file__).parents[1] / "fixtures" / "mmseg_configs"
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


def mmcv_rescale(image: np.ndarray, scale) -> np.ndarray:
    """mmcv.imrescale as mmseg's test ``Resize(scale, keep_ratio=True)`` calls it (backend cv2, bilinear): factor
    min(long / max(h, w), short / min(h, w)), sides int(x * f + 0.5) (``rescale_size``), then OpenCV itself."""
    cv2 = pytest.importorskip("cv2", reason="mmseg resizes with OpenCV: pip install -e '.[mmseg]'")
    h, w = image.shape[:2]
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return cv2.resize(image, (int(w * factor + 0.5), int(h * factor + 0.5)), interpolation=cv2.INTER_LINEAR)


def mmseg_pipeline(sd: dict, image: np.ndarray, *, mode: str, align_corners: bool, crop=None, stride=None, resize=None):
    """LoadImageFromFile (BGR) -> test Resize (keep_ratio, on the BGR image) -> SegDataPreProcessor (bgr_to_rgb,
    (x - mean) / std, no test padding: it has no test_cfg) -> slide/whole inference -> postprocess (logits resized
    back to the image's size with align_corners) -> softmax. (C, H, W)."""
    h0, w0 = image.shape[:2]
    bgr = np.ascontiguousarray(image[..., ::-1])  # what cv2.imread gives
    if resize is not None:
        bgr = mmcv_rescale(bgr, resize)
    x = torch.from_numpy(bgr.copy()).permute(2, 0, 1)[[2, 1, 0], ...].float()  # bgr_to_rgb, (3, H, W)
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
        if logits.shape[-2:] != (h0, w0):
            logits = F.interpolate(logits, size=(h0, w0), mode="bilinear", align_corners=align_corners)
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
    assert cfg.data.eval_pad_multiple == 0 and cfg.data.eval_resize == [2049, 1025]  # the test Resize
    assert cfg.data.resize_backend == "cv2"  # mmcv's default: OpenCV INTER_LINEAR
    # the mmcv (mmseg 0.x) text of the same config says the same
    old = _mmseg_model(tmp_path_factory, MMCV_769, "mmcv769")[2].config
    assert (old.model.align_corners, old.eval.mode, old.eval.crop_size, old.eval.stride) == (
        True,
        "slide",
        [769, 769],
        [513, 513],
    )
    assert (old.data.eval_resize, old.data.resize_backend) == ([2049, 1025], "cv2")


@pytest.mark.parametrize(
    "size, crop, stride, resize",
    [
        ((45, 61), None, None, None),  # as converted: Resize to (2049, 1025) keep_ratio, 769/513 windows
        ((45, 61), None, None, "null"),  # no Resize: one 769 window, clipped to the image
        ((45, 61), (33, 41), (21, 27), "[97,65]"),  # a small Resize, several windows on both axes
        ((38, 53), (49, 41), (32, 27), "null"),  # taller than the image: clipped in H, slides in W
    ],
)
def test_mmseg_769_model_through_predictor_is_mmsegs_pipeline(mmseg_769, size, crop, stride, resize):
    sd, folder, _ = mmseg_769
    options = {} if crop is None else {"crop_size": crop, "stride": stride}
    overrides = [] if resize is None else [f"data.eval_resize={resize}"]
    predictor = Predictor.from_source(folder, device="cpu", overrides=overrides, **options)
    image = _image(*size, seed=size[1])
    got = predictor(image, probs=True)
    scale = {None: (2049, 1025), "null": None, "[97,65]": (97, 65)}[resize]
    want = mmseg_pipeline(
        sd, image, mode="slide", align_corners=True, crop=crop or (769, 769), stride=stride or (513, 513), resize=scale
    )
    labels, probs = _agree(got, want)
    assert labels >= 0.999 and probs <= 1e-3, (labels, probs)
    assert got.labels.shape == size


def test_mmseg_512x1024_model_runs_whole_without_align_corners(tmp_path_factory):
    sd, folder, result = _mmseg_model(tmp_path_factory, MMSEG_512, "mm512")
    assert result.config.model.align_corners is False and result.config.eval.mode == "whole"
    assert (result.config.data.eval_resize, result.config.data.resize_backend) == ([2048, 1024], "cv2")
    image = _image(38, 53, seed=7)
    got = Predictor.from_source(folder, device="cpu")(image, probs=True)
    labels, probs = _agree(got, mmseg_pipeline(sd, image, mode="whole", align_corners=False, resize=(2048, 1024)))
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
def test_emanet_eval_scores_the_source_pipelines_labels_as_all_correct(reference_model, mmseg_769, source, tmp_path):
    """`emanet eval` on a folder dataset whose masks are the source pipeline's labels: aAcc >= 99.9%."""
    if source == "reference":
        sd, folder = reference_model
        truth = [reference_pipeline(sd, _image(*s, seed=s[0])) for s in SIZES]
    else:  # as converted: the test Resize to (2049, 1025), slide 769/513
        sd, folder, _ = mmseg_769
        kw = dict(mode="slide", align_corners=True, crop=(769, 769), stride=(513, 513), resize=(2049, 1025))
        truth = [mmseg_pipeline(sd, _image(*s, seed=s[0]), **kw) for s in SIZES]
    for d in ("images/val", "masks/val"):
        (tmp_path / "data" / d).mkdir(parents=True)
    (tmp_path / "data" / "classes.txt").write_text("\n".join(f"c{i}" for i in range(truth[0].shape[0])))
    for i, (size, probs) in enumerate(zip(SIZES, truth)):
        Image.fromarray(_image(*size, seed=size[0])).save(tmp_path / "data" / "images" / "val" / f"{i}.png")
        Image.fromarray(probs.argmax(0).numpy().astype(np.uint8)).save(tmp_path / "data" / "masks" / "val" / f"{i}.png")
    out = tmp_path / "eval.json"
    cmd = [
        sys.executable,
        "-m",
        "emanet",
        "eval",
        str(folder),
        "data.dataset=folder",
        f"data.root={tmp_path / 'data'}",
        "data.num_workers=0",
        "data.train_split=val",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["images"] == 2 and results["aAcc"] >= 0.999, results["aAcc"]


def test_keep_ratio_resize_sizes_and_its_config_rule():
    # mmcv: factor = min(2049 / 2048, 1025 / 1024) = 1.000488..; int(2048 f + 0.5) = 2049, int(1024 f + 0.5) = 1025
    assert keep_ratio_size(1024, 2048, (2049, 1025)) == (1025, 2049)
    assert keep_ratio_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert keep_ratio_size(45, 61, (97, 65)) == (65, 88)  # factor min(97 / 61, 65 / 45) = 1.444..
    assert keep_ratio_size(600, 400, (2048, 512)) == (768, 512)  # portrait: the short side decides
    with pytest.raises(ValueError, match="data.eval_pad_multiple must be 0 with data.eval_resize"):
        load_config(None, ["data.eval_resize=[2049,1025]"])  # the default config pads to 1 mod 8
    assert load_config(None, ["data.eval_resize=[2049,1025]", "data.eval_pad_multiple=0"]).data.eval_resize == [
        2049,
        1025,
    ]
    with pytest.raises(ValueError, match="data.eval_resize must be 2 positive numbers"):
        load_config(None, ["data.eval_resize=[2049]", "data.eval_pad_multiple=0"])
