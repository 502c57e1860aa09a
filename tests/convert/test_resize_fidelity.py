"""mmseg's keep-ratio test ``Resize``, end to end: a model run as converted mmseg models are (``data.eval_resize``,
``data.resize_backend: cv2``) through ``Predictor`` gives the labels of mmseg's test pipeline, re-implemented
here from its code: LoadImageFromFile (BGR) -> ``Resize(scale, keep_ratio=True)`` (mmcv.imrescale: cv2.resize
INTER_LINEAR at ``rescale_size``) -> SegDataPreProcessor (bgr_to_rgb, (x - mean) / std) -> whole inference ->
logits resized back to the image with the head's align_corners -> argmax.

The model is a tiny random-weight EMANet in mmseg's head layout whose BatchNorm statistics are calibrated on
images like the test's (random running statistics make a network whose labels hardly depend on its input).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from emanet.config import RECIPES_DIR, Config, load_config
from emanet.convert.mmseg_config import parse_mmseg_meta
from emanet.deploy.predict import Predictor
from emanet.errors import MissingExtra
from emanet.models.emanet import build_model
from emanet.pretrained import save_pretrained
from tests.conftest import tiny_model
from tests.convert.test_fidelity import _image

FIXTURES = Path(__file__).parents[1] / "fixtures" / "mmseg_configs"
MEAN = (123.675, 116.28, 103.53)  # mmseg's Cityscapes preprocessor, RGB on 0-255
STD = (58.395, 57.12, 57.375)
NO_CV2 = "mmseg resizes with OpenCV, the mmseg extra (pip install -e '.[mmseg]'); the dev extra installs it"

pytestmark = pytest.mark.usefixtures("one_thread")


def calibrated_model(seed: int = 0, *, align_corners: bool = True) -> torch.nn.Module:
    """tiny_model in mmseg's head layout; BN running statistics = the exact averages over 4 batches of _image."""
    torch.manual_seed(seed)
    model = build_model(tiny_model(head_layout="mmseg", align_corners=align_corners, num_classes=5))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(4):
            batch = np.stack([_image(65, 97, seed=100 + 2 * i + j) for j in range(2)])
            model(normalise(batch))
    model.eval()
    return model


def normalise(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) RGB uint8 -> (B, 3, H, W) as SegDataPreProcessor: (x - mean) / std on 0-255."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def mmseg_labels(model, image: np.ndarray, scale, *, align_corners: bool) -> np.ndarray:
    """mmseg's test pipeline with a keep-ratio Resize and whole inference: labels (H, W) at the image's size."""
    cv2 = pytest.importorskip("cv2", reason=NO_CV2)
    h0, w0 = image.shape[:2]
    bgr = np.ascontiguousarray(image[..., ::-1])  # LoadImageFromFile: cv2.imread order
    factor = min(max(scale) / max(h0, w0), min(scale) / min(h0, w0))  # mmcv.rescale_size
    bgr = cv2.resize(bgr, (int(w0 * factor + 0.5), int(h0 * factor + 0.5)), interpolation=cv2.INTER_LINEAR)
    x = normalise(bgr[None, ..., ::-1])  # bgr_to_rgb
    with torch.no_grad():
        logits = model(x)  # (1, C, h, w): the decode head's output resized to the input with align_corners
        logits = F.interpolate(logits, size=(h0, w0), mode="bilinear", align_corners=align_corners)
    return logits[0].argmax(0).numpy()


def resized_config(model_cfg, scale, backend: str) -> Config:
    cfg = Config(model=model_cfg)
    d = cfg.data
    d.mean, d.std, d.eval_pad_multiple = [m / 255 for m in MEAN], [s / 255 for s in STD], 0
    d.eval_resize, d.resize_backend = list(scale), backend
    cfg.eval.mode = "whole"
    cfg.validate()
    return cfg


def agreement(model, image: np.ndarray, scale, backend: str) -> float:
    """Share of pixels where Predictor (with ``backend``) and mmseg's pipeline give the same label."""
    cfg = resized_config(tiny_model(head_layout="mmseg", align_corners=True, num_classes=5), scale, backend)
    got = Predictor(model, cfg, device="cpu")(image).labels
    want = mmseg_labels(model, image, scale, align_corners=True)
    assert got.shape == want.shape == image.shape[:2]
    return float((got == want).mean())


@pytest.fixture(scope="module")
def model():
    return calibrated_model()


# (height, width, (long, short)): slight upsampling as Cityscapes 1024x2048 -> 1025x2049, odd sizes, downsampling
SMALL = [(255, 511, (513, 257)), (37, 53, (97, 65)), (129, 193, (97, 65))]


@pytest.mark.parametrize("h, w, scale", SMALL)
def test_cv2_backend_gives_mmsegs_labels(model, h, w, scale):
    pytest.importorskip("cv2", reason=NO_CV2)
    image = _image(h, w, seed=h)
    assert agreement(model, image, scale, "cv2") >= 0.999  # measured: 100%
    assert agreement(model, image, scale, "torch") < 0.99  # one grey level here and there: 96.8-97.5% here


@pytest.mark.slow
def test_cityscapes_769_config_gives_mmsegs_labels_and_the_torch_resize_does_not():
    """A 1024x2048 image seen at 1025x2049, as the 769x769 Cityscapes configs resize it."""
    pytest.importorskip("cv2", reason=NO_CV2)
    model, image = calibrated_model(seed=1), _image(1024, 2048, seed=3)
    cv2_agree = agreement(model, image, (2049, 1025), "cv2")
    torch_agree = agreement(model, image, (2049, 1025), "torch")
    print(f"1024x2048 -> 1025x2049, whole: cv2 backend {cv2_agree:.4%}, torch backend {torch_agree:.4%}")
    assert cv2_agree >= 0.999 and torch_agree < cv2_agree


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.txt")))
def test_mmseg_configs_resize_with_opencv_and_native_recipes_do_not(name):
    key = "cfg" if name.startswith("mmengine") else "config"
    data = parse_mmseg_meta({key: (FIXTURES / name).read_text()})["data"]
    assert data["resize_backend"] == "cv2" and data["eval_resize"] in ([2048, 1024], [2049, 1025])
    for recipe in sorted(RECIPES_DIR.glob("*.yaml")):
        assert load_config(str(recipe)).data.resize_backend == "torch", recipe.name
    assert Config().data.resize_backend == "torch"


def test_a_pillow_resize_in_the_source_config_is_said_not_reproduced():
    text = (FIXTURES / "mmengine_emanet_r50-d8_4xb2-80k_cityscapes-512x1024.txt").read_text()
    assert "dict(keep_ratio=True, scale=(" in text
    out = parse_mmseg_meta(
        {"cfg": text.replace("dict(keep_ratio=True, scale=(", "dict(backend='pillow', keep_ratio=True, scale=(")}
    )
    assert any("not reproduced" in n and "pillow" in n for n in out["notes"])


def test_resize_backend_is_checked_like_every_field():
    with pytest.raises(ValueError, match="data.resize_backend must be 'torch' or 'cv2', got 'pil'"):
        load_config(None, ["data.resize_backend=pil"])


def test_predictor_without_opencv_names_the_extra_when_built(model, monkeypatch):
    cfg = resized_config(tiny_model(head_layout="mmseg", align_corners=True, num_classes=5), (97, 65), "cv2")
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    with pytest.raises(MissingExtra, match=r"pip install 'emanet\[mmseg\]'"):
        Predictor(model, cfg, device="cpu")
    cfg.data.eval_resize = None  # no resize: OpenCV is not needed
    Predictor(model, cfg, device="cpu")


def test_emanet_predict_without_opencv_exits_2_naming_the_extra(model, tmp_path):
    cfg = resized_config(tiny_model(head_layout="mmseg", align_corners=True, num_classes=5), (97, 65), "cv2")
    folder = save_pretrained(model, cfg, tmp_path / "model")
    (tmp_path / "nocv2" / "cv2").mkdir(parents=True)
    (tmp_path / "nocv2" / "cv2" / "__init__.py").write_text("raise ImportError('OpenCV is not installed here')\n")
    image = tmp_path / "img.png"
    Image.fromarray(_image(37, 53, seed=1)).save(image)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "nocv2"), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "emanet", "predict", str(folder), str(image), "--out", str(tmp_path / "out")]
    proc = subprocess.run(
        [*cmd, "--device", "cpu", "--no-progress"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'emanet[mmseg]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
