"""Paired transforms: the image and its label map move together.

Every transform is called as ``t(image, label, rng)`` with a PIL RGB image, a (H, W) uint8 label array and
an ``np.random.Generator`` (the dataset's ``rng``; deterministic transforms ignore it). Geometry uses
bilinear interpolation for the image and nearest for the label. ``ToTensorNormalize`` is the last step and
returns a float tensor (3, H, W) and an int64 tensor (H, W). Sizes are (height, width) throughout.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageEnhance

from emanet.errors import MissingExtra, install_hint
from emanet.fields import one_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_FILL = (124, 116, 104)  # ImageNet mean * 255, rounded: normalises to ~0
REFERENCE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)  # EMANet's VOC recipe
ScaleMode = Literal["auto", "range", "choice"]  # RandomScale: by the list's length, a (min, max) range, choices
# KeepRatioResize's 8-bit bilinear resize (data.resize_backend): "torch" rounds half-pixel bilinear to 8 bits (emanet's
# own models); "cv2" is OpenCV's INTER_LINEAR itself (11-bit fixed-point weights), as mmcv resizes mmseg's test images
ResizeBackend = Literal["torch", "cv2"]


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _require_rng(rng: np.random.Generator | None, name: str) -> np.random.Generator:
    if rng is None:
        raise ValueError(f"{name} is random: call it as t(image, label, rng) with an np.random.Generator")
    return rng


def fill_from_mean(mean: Sequence[float]) -> tuple[int, int, int]:
    """The 0..255 RGB value that normalises to (about) 0: the padding colour, as in the reference."""
    return tuple(int(round(m * 255)) for m in mean)


def resize_pair(image: Image.Image, label: np.ndarray, size: tuple[int, int]):
    h, w = size
    image = image.resize((w, h), Image.Resampling.BILINEAR)
    label = np.asarray(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))
    return image, label


def pad_pair(image: Image.Image, label: np.ndarray, size: tuple[int, int], fill_image, fill_label: int):
    """Pad bottom/right to (at least) ``size``; never crops."""
    h, w = max(size[0], image.height), max(size[1], image.width)
    if (h, w) == (image.height, image.width):
        return image, label
    canvas = Image.new("RGB", (w, h), tuple(fill_image))
    canvas.paste(image, (0, 0))
    padded = np.full((h, w), fill_label, dtype=np.uint8)
    padded[: label.shape[0], : label.shape[1]] = label
    return canvas, padded


class Compose:
    """Apply paired transforms in order: ``(image, label, rng) -> (image, label)``."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, label, rng: np.random.Generator | None = None):
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomScale:
    """Resize by a random factor.

    ``scales`` of length 2 is a (min, max) range sampled uniformly; longer lists (e.g. ``REFERENCE_SCALES``)
    are choices; one value is a fixed factor. ``mode="choice"`` forces a two-element list to be choices.
    """

    def __init__(self, scales: Sequence[float], *, mode: ScaleMode = "auto"):
        scales = tuple(float(s) for s in scales)
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive, got {scales}")
        if mode not in typing.get_args(ScaleMode):
            raise ValueError(f"mode must be {one_of(typing.get_args(ScaleMode))}, got {mode!r}")
        if mode == "range" and len(scales) != 2:
            raise ValueError(f"a scale range needs (min, max), got {scales}")
        self.scales = scales
        self.is_range = len(scales) == 2 and mode != "choice"

    def sample(self, rng: np.random.Generator) -> float:
        """One scale factor drawn with ``rng``."""
        if self.is_range:
            return float(rng.uniform(min(self.scales), max(self.scales)))
        return self.scales[int(rng.integers(len(self.scales)))]

    def __call__(self, image, label, rng=None):
        s = self.sample(_require_rng(rng, "RandomScale"))
        size = (max(1, round(image.height * s)), max(1, round(image.width * s)))
        return resize_pair(image, label, size)

    def __repr__(self) -> str:
        kind = "range" if self.is_range else "choice"
        return f"RandomScale({self.scales}, {kind})"


class PadToSize:
    """Pad bottom/right so that H >= size[0] and W >= size[1]."""

    def __init__(self, size: int | Sequence[int], fill_image=MEAN_FILL, fill_label: int = 255):
        self.size = _size2(size)
        self.fill_image = tuple(int(v) for v in fill_image)
        self.fill_label = fill_label

    def __call__(self, image, label, rng=None):
        return pad_pair(image, label, self.size, self.fill_image, self.fill_label)


class PadToMultiple:
    """Pad bottom/right to the smallest H, W with ``H % multiple == offset`` (reference eval: 8, offset 1)."""

    def __init__(self, multiple: int, offset: int = 0, fill_image=MEAN_FILL, fill_label=255):
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        self.multiple, self.offset = multiple, offset % multiple
        self.fill_image = tuple(int(v) for v in fill_image)
        self.fill_label = fill_label

    def target(self, n: int) -> int:
        """The padded size of a side of length ``n``."""
        return n + (self.offset - n) % self.multiple

    def __call__(self, image, label, rng=None):
        size = (self.target(image.height), self.target(image.width))
        return pad_pair(image, label, size, self.fill_image, self.fill_label)


class RandomCrop:
    """Crop a random (h, w) window; an image smaller than the window is kept whole along that side
    (put ``PadToSize`` first for a fixed output size)."""

    def __init__(self, size: int | Sequence[int]):
        self.size = _size2(size)

    def __call__(self, image, label, rng=None):
        rng = _require_rng(rng, "RandomCrop")
        ch, cw = min(self.size[0], image.height), min(self.size[1], image.width)
        top = int(rng.integers(image.height - ch + 1))
        left = int(rng.integers(image.width - cw + 1))
        image = image.crop((left, top, left + cw, top + ch))
        return image, label[top : top + ch, left : left + cw]


class RandomHorizontalFlip:
    """Flip image and label left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, label, rng=None):
        if _require_rng(rng, "RandomHorizontalFlip").random() < self.p:
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), np.ascontiguousarray(label[:, ::-1])
        return image, label


class ColorJitter:
    """Photometric jitter of the image only: each factor drawn from [1 - x, 1 + x] (0 turns it off)."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0):
        self.factors = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
        self._enhancers = {
            "brightness": ImageEnhance.Brightness,
            "contrast": ImageEnhance.Contrast,
            "saturation": ImageEnhance.Color,
        }

    def __call__(self, image, label, rng=None):
        rng = _require_rng(rng, "ColorJitter")
        for key, amount in self.factors.items():
            if amount > 0:
                factor = float(rng.uniform(max(0.0, 1 - amount), 1 + amount))
                image = self._enhancers[key](image).enhance(factor)
        return image, label


class Resize:
    """Resize to (h, w), or with an int so that the shorter side equals it (aspect kept)."""

    def __init__(self, size: int | Sequence[int]):
        self.size = size

    def __call__(self, image, label, rng=None):
        if isinstance(self.size, int):
            s = self.size / min(image.height, image.width)
            size = (max(1, round(image.height * s)), max(1, round(image.width * s)))
        else:
            size = _size2(self.size)
        return resize_pair(image, label, size)


class ToTensorNormalize:
    """PIL RGB -> float tensor (3, H, W) as (RGB/255 - mean)/std; label -> int64 tensor (H, W)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, image, label, rng=None):
        x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
        x = (x - self.mean) / self.std
        tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)
        return tensor, torch.from_numpy(np.asarray(label, dtype=np.int64))


def keep_ratio_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale (mmseg's test ``Resize(scale, keep_ratio=True)``): the image's aspect ratio,
    long side at most ``max(scale)``, short side at most ``min(scale)``, each side ``int(side * f + 0.5)``, as
    mmcv's ``rescale_size`` / ``_scale_size`` compute it; only a side that would round to 0 (where OpenCV would
    refuse the size) is kept at 1. -> (height, width)"""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _cv2():
    """OpenCV, imported late: only the "cv2" resize backend needs it (the ``mmseg`` extra)."""
    try:
        import cv2
    except ImportError as e:
        raise MissingExtra(
            "data.resize_backend='cv2' (OpenCV's bilinear resize, as mmsegmentation resizes its test images) needs "
            f"OpenCV: {install_hint('mmseg')}"
        ) from e
    return cv2


class KeepRatioResize:
    """Resize the image only (the label keeps its size: predictions are resized back to it) to
    ``keep_ratio_size``, bilinear with half-pixel centres and no antialiasing.

    ``backend="cv2"``: ``cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)``, exactly what mmcv's
    ``imrescale`` does to mmseg's test images (bilinear works per channel, so mmseg's BGR order and our RGB
    give the same pixels). ``backend="torch"``: the same interpolation in float32, rounded to 8 bits; it
    differs from OpenCV's fixed-point weights by one grey level on about a third of the pixels. OpenCV is
    imported when the transform is built, so a missing ``mmseg`` extra is an error then, not at the first image.
    """

    def __init__(self, scale: Sequence[int], *, backend: ResizeBackend = "torch"):
        if len(scale) != 2 or min(scale) < 1:
            raise ValueError(f"scale must be (long, short) positive ints, got {scale!r}")
        if backend not in typing.get_args(ResizeBackend):
            raise ValueError(f"backend must be {one_of(typing.get_args(ResizeBackend))}, got {backend!r}")
        self.scale = (int(max(scale)), int(min(scale)))
        self.backend = backend
        if backend == "cv2":
            _cv2()  # not kept: a module does not pickle (DataLoader workers under spawn)

    def __call__(self, image: Image.Image, label, rng=None):
        size = keep_ratio_size(image.height, image.width, self.scale)
        if size == (image.height, image.width):
            return image, label  # OpenCV copies an image resized to its own size
        if self.backend == "cv2":
            cv2 = _cv2()
            out = cv2.resize(np.asarray(image), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)  # (h, w, 3)
            return Image.fromarray(out), label
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]  # (1, 3, H, W)
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        out = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()  # (h, w, 3)
        return Image.fromarray(np.ascontiguousarray(out)), label

    def __repr__(self) -> str:
        return f"KeepRatioResize({self.scale}, backend={self.backend!r})"


class PadNormalizedToMultiple:
    """Pad a normalised (3, H, W) tensor bottom/right with 0 to the smallest H, W with ``H % multiple ==
    offset``; the label with ``fill_label``. Both sources pad after normalisation with 0 (the reference's
    ``pad_inf``, mmseg's ``SegDataPreProcessor`` ``pad_val=0``), i.e. exactly the mean colour."""

    def __init__(self, multiple: int, offset: int = 0, fill_label: int = 255):
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        self.multiple, self.offset, self.fill_label = multiple, offset % multiple, fill_label

    def target(self, n: int) -> int:
        return n + (self.offset - n) % self.multiple

    def __call__(self, image: torch.Tensor, label: torch.Tensor, rng=None):
        h, w = image.shape[-2:]
        ph, pw = self.target(h) - h, self.target(w) - w
        if ph == 0 and pw == 0:
            return image, label
        image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0.0)  # (3, Hp, Wp)
        label = torch.nn.functional.pad(label, (0, pw, 0, ph), value=self.fill_label)  # (Hp, Wp)
        return image, label


def train_transform(
    *,
    crop_size: int | Sequence[int],
    scales: Sequence[float] | None = REFERENCE_SCALES,
    flip: bool = True,
    jitter: float | dict | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = 255,
) -> Compose:
    """The reference recipe: random scale -> pad to the crop (mean / ignore) -> random crop -> flip.

    ``jitter`` adds ColorJitter (a float for all three factors, or a dict of its keywords). Padding happens
    on 8-bit images, so the padded pixels normalise to within 0.5/255/std (< 0.01) of 0.
    """
    steps: list = []
    if scales:
        steps.append(RandomScale(scales))
    steps += [PadToSize(crop_size, fill_from_mean(mean), ignore_index), RandomCrop(crop_size)]
    if flip:
        steps.append(RandomHorizontalFlip())
    if jitter:
        kwargs = jitter if isinstance(jitter, dict) else dict.fromkeys(("brightness", "contrast", "saturation"), jitter)
        steps.append(ColorJitter(**kwargs))
    steps.append(ToTensorNormalize(mean, std))
    return Compose(steps)


def eval_transform(
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    pad_multiple: int | None = None,
    pad_offset: int = 0,
    size: int | Sequence[int] | None = None,
    ignore_index: int = 255,
    keep_ratio_resize: Sequence[int] | None = None,
    resize_backend: ResizeBackend = "torch",
) -> Compose:
    """Optional resize, normalise, optional pad to ``H % pad_multiple == pad_offset`` (reference: 8 and 1).

    The padding is 0 on the normalised tensor (exactly the mean), as both source pipelines pad: EM
    attention is global, so padded pixels move the bases and with them every pixel's prediction.
    ``keep_ratio_resize`` (long, short): mmseg's test ``Resize``, on the image only (``KeepRatioResize`` with
    ``resize_backend``).
    """
    steps: list = []
    if keep_ratio_resize is not None:
        steps.append(KeepRatioResize(keep_ratio_resize, backend=resize_backend))
    if size is not None:
        steps.append(Resize(size))
    steps.append(ToTensorNormalize(mean, std))
    if pad_multiple:
        steps.append(PadNormalizedToMultiple(pad_multiple, pad_offset, ignore_index))
    return Compose(steps)
