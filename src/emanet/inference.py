"""Test-time prediction: whole image, sliding window, multi-scale + flip.

All functions take normalised images (B, 3, H, W) and a model in the mode the caller chose (normally
``model.eval()``); nothing here changes ``model.training``. ``infer_whole``/``infer_slide`` return logits,
``infer`` returns class probabilities averaged over every (scale, flip) pass, as in the EMANet reference and
mmsegmentation's test-time augmentation.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emanet.errors import ConfigError

Mode = Literal["whole", "slide"]
MODES: tuple[str, ...] = typing.get_args(Mode)


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)
    if len(pair) != 2 or min(pair) < 1:
        raise ConfigError(f"{name} must be a positive int or (height, width), got {v!r}")
    return pair  # type: ignore[return-value]


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    out = model(images)
    # A model with an auxiliary head left in training mode returns {"out", "aux"}; only "out" predicts.
    return out["out"] if isinstance(out, dict) else out


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride``, the last one snapped so it ends at the border.

    ``length <= crop`` gives a single window at 0, clipped to the image (``infer_slide``).
    """
    if length <= crop:
        return [0]
    # range() stops before length - crop, which is then added once: no duplicate window at the border.
    return list(range(0, length - crop, stride)) + [length - crop]


@torch.inference_mode()
def infer_whole(model: nn.Module, images: Tensor) -> Tensor:
    """One forward over the full images: (B, 3, H, W) -> logits (B, C, H, W)."""
    return _logits(model, images)


@torch.inference_mode()
def infer_slide(
    model: nn.Module,
    images: Tensor,
    *,
    crop_size: int | Sequence[int],
    stride: int | Sequence[int],
    num_classes: int | None = None,
    batch_size: int = 4,
) -> Tensor:
    """Sliding-window logits (B, C, H, W): windows' logits summed, divided by how many windows saw each pixel.

    Windows of ``crop_size`` every ``stride``; the last one on each axis ends at the border, so no window
    leaves the image and every pixel is covered. On an axis shorter than the crop the window is clipped to
    the image (one window of the image's own length, as mmsegmentation's ``slide_inference``): nothing is
    padded, so an image smaller than the crop gets exactly the whole-image forward. Padding would not be
    neutral: EM attention is global, so padded pixels move the bases and every pixel's output.
    ``num_classes`` None: taken from the model's output. Windows of one image run ``batch_size`` at a time.
    """
    (ch, cw), (sh, sw) = _pair(crop_size, "crop_size"), _pair(stride, "stride")
    if sh > ch or sw > cw:
        raise ConfigError(
            f"stride {(sh, sw)} must not exceed crop_size {(ch, cw)}: pixels between windows would get no prediction"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    b, _, h, w = images.shape
    ch, cw = min(ch, h), min(cw, w)  # windows clipped to the image on axes shorter than the crop
    boxes = [(y, x) for y in window_starts(h, ch, sh) for x in window_starts(w, cw, sw)]

    count = torch.zeros(h, w, device=images.device)  # (H, W), identical for every image
    for y, x in boxes:
        count[y : y + ch, x : x + cw] += 1

    out: Tensor | None = None
    for i in range(b):
        crops = torch.stack([images[i, :, y : y + ch, x : x + cw] for y, x in boxes])  # (n_win, 3, ch, cw)
        for k in range(0, len(boxes), batch_size):
            logits = _logits(model, crops[k : k + batch_size])  # (n, C, ch, cw)
            if logits.shape[-2:] != (ch, cw):
                raise ValueError(
                    f"the model returned logits of size {tuple(logits.shape[-2:])} for a "
                    f"{(ch, cw)} window; it must upsample to its input size"
                )
            if out is None:
                c = num_classes if num_classes is not None else logits.shape[1]
                # float32 at least: half-precision sums of many overlapping windows lose digits
                dtype = torch.promote_types(logits.dtype, torch.float32)
                out = torch.zeros(b, c, h, w, device=images.device, dtype=dtype)  # (B, C, H, W)
            if logits.shape[1] != out.shape[1]:
                raise ValueError(f"num_classes={out.shape[1]} but the model returned {logits.shape[1]} channels")
            for (y, x), window in zip(boxes[k : k + batch_size], logits):
                out[i, :, y : y + ch, x : x + cw] += window
    assert out is not None  # b >= 1 and at least one window
    return out / count  # (B, C, H, W)


def check_inference_args(mode: str, scales: Sequence[float], crop_size: Any, stride: Any) -> None:
    """Raise ConfigError for an unknown mode, non-positive scales, or slide without crop_size and stride."""
    if mode not in MODES:
        raise ConfigError(f"inference mode must be one of {MODES}, got {mode!r}")
    if len(scales) == 0 or any(not s > 0 for s in scales):
        raise ConfigError(f"scales must be a non-empty list of positive factors, e.g. (0.75, 1.0, 1.25), got {scales}")
    if mode == "slide" and (crop_size is None or stride is None):
        raise ConfigError(
            f"mode 'slide' needs crop_size and stride (e.g. crop_size=(769, 769), stride=(513, 513)), "
            f"got crop_size={crop_size!r}, stride={stride!r}"
        )


def _resize(x: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x  # exact pass-through: scale 1.0 must reproduce the plain forward bit for bit
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


@torch.inference_mode()
def infer(
    model: nn.Module,
    images: Tensor,
    *,
    align_corners: bool,
    mode: Mode = "whole",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    num_classes: int | None = None,
    batch_size: int = 4,
    out_size: Sequence[int] | None = None,
    probabilities: bool = True,
) -> Tensor:
    """Class probabilities (B, C, H, W) averaged over scales x {no flip, horizontal flip}.

    Per pass: resize the images by the scale (bilinear), predict (whole or sliding window), un-flip, resize
    the logits back to (H, W), softmax. With ``scales=(1.0,)`` and no flip this is softmax(model(images)).
    ``align_corners`` is the model's (``config.model.align_corners``), so the resizes here match its upsampling.
    ``out_size`` (H0, W0): resize each pass's logits to it instead of (H, W) (an image resized before, as
    mmseg's test Resize, predicted at its original size, as mmseg's postprocessing does).
    ``probabilities=False``: scores with the same argmax, for callers that want labels only: a single pass
    returns its resized logits (the softmax is monotonic), so no full-resolution softmax is computed.
    """
    check_inference_args(mode, scales, crop_size, stride)
    h, w = images.shape[-2:]
    target = (int(out_size[0]), int(out_size[1])) if out_size is not None else (h, w)

    def predict(x: Tensor) -> Tensor:
        if mode == "whole":
            return infer_whole(model, x)
        return infer_slide(model, x, crop_size=crop_size, stride=stride, num_classes=num_classes, batch_size=batch_size)

    def passes():  # each (scale, flip) pass's logits at the target size
        for scale in scales:
            # mmsegmentation's rounding: int(side * scale + 0.5), at least one pixel
            size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
            x = _resize(images, size, align_corners)  # (B, 3, h*s, w*s)
            yield _resize(predict(x), target, align_corners)
            if flip:  # flip back so pixels line up with the input
                yield _resize(predict(x.flip(-1)).flip(-1), target, align_corners)

    if not probabilities and len(scales) == 1 and not flip:
        return next(passes())
    probs: Tensor | None = None
    n = 0
    for logits in passes():
        p = torch.softmax(logits, dim=1)  # (B, C, H0, W0)
        probs = p if probs is None else probs + p
        n += 1
    assert probs is not None
    return probs / n
