"""EM attention maps: which bases an image's pixels are assigned to, drawn as heat maps over the image.

The EMA unit's responsibilities z (K, h, w) say, for every feature pixel, how much each base k explains it
(a softmax over K: they sum to 1 per pixel). A base's "mass" is its responsibility summed over the pixels;
the bases with the most mass are the image's dominant groups (the paper's Fig. 5). Pure numpy + PIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from emanet.checkpoint import atomic_path
from emanet.errors import ConfigError
from emanet.models.em import EMAUnit, ema_units

# A blue -> cyan -> green -> yellow -> red ramp (value in [0, 1] -> RGB), like the usual "jet" heat map.
_RAMP_X = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_RAMP_RGB = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], float)

TITLE_HEIGHT = 14  # pixels above each panel for its title
GAP = 4  # pixels between and around panels


def attention_unit(model: nn.Module) -> EMAUnit:
    """The model's EMA unit (the last one if several); a clear error for models without EM attention."""
    units = ema_units(model)
    if not units:
        raise ConfigError(
            f"{type(model).__name__} has no EM attention unit (an 'fcn' or 'nonlocal' model?): attention maps "
            "need an EMANet model (model.arch=emanet)"
        )
    return units[-1]


class capture_attention:  # noqa: N801 (a context manager, used like a function)
    """``with capture_attention(model) as cap: model(x)`` -> ``cap.responsibilities`` (B, K, h, w).

    Turns on the unit's ``store_attention`` for the block and restores it afterwards; the unit's stored
    tensors are released on exit, so nothing large stays referenced by the model. The LAST forward inside
    the block is the one captured.
    """

    def __init__(self, model: nn.Module) -> None:
        self.unit = attention_unit(model)
        self.responsibilities: torch.Tensor | None = None

    def __enter__(self) -> capture_attention:
        self._previous = self.unit.store_attention
        self.unit.store_attention = True
        self.unit.last_responsibilities = self.unit.last_bases = None
        return self

    def __exit__(self, *exc) -> None:
        self.responsibilities = self.unit.last_responsibilities
        self.unit.store_attention = self._previous
        self.unit.last_responsibilities = self.unit.last_bases = None


def _check_resp(resp: np.ndarray) -> np.ndarray:
    resp = np.asarray(resp)
    if resp.ndim != 3 or resp.shape[0] < 1:
        raise ValueError(f"responsibilities must be (K, h, w), got shape {resp.shape}")
    return resp


def top_bases(responsibilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` bases with the most mass, heaviest first: (indices int64 (k,), mass shares float64 (k,)).

    Mass = responsibility summed over pixels; share = mass / total mass (the shares of all K bases sum to 1).
    ``k`` larger than K gives all K bases.
    """
    resp = _check_resp(responsibilities)
    if k < 1:
        raise ValueError(f"the number of bases to show must be >= 1, got {k}")
    mass = resp.reshape(resp.shape[0], -1).astype(np.float64).sum(axis=1)  # (K,)
    share = mass / max(mass.sum(), 1e-12)
    order = np.argsort(-mass, kind="stable")[: min(k, len(mass))]
    return order.astype(np.int64), share[order]


def upsample_maps(
    responsibilities: np.ndarray,
    *,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    align_corners: bool,
) -> np.ndarray:
    """Feature-resolution maps (K, h, w) of a padded input -> (K, H, W) over the original image.

    The features cover the padded input (Hp, Wp): upsample to it bilinearly with the model's
    ``align_corners`` (as the model upsamples its logits), then crop the bottom/right padding away.
    """
    resp = _check_resp(responsibilities)
    (hp, wp), (h, w) = padded_size, image_size
    if h > hp or w > wp:
        raise ValueError(f"image_size {image_size} is larger than padded_size {padded_size}")
    maps = torch.from_numpy(np.ascontiguousarray(resp, dtype=np.float32))[None]  # (1, K, h, w)
    maps = F.interpolate(maps, size=(hp, wp), mode="bilinear", align_corners=align_corners)
    return maps[0, :, :h, :w].numpy()  # (K, H, W)


def heatmap(values: np.ndarray, vmax: float = 1.0) -> np.ndarray:
    """(H, W) values in [0, vmax] -> (H, W, 3) uint8 colours of the blue-to-red ramp."""
    v = np.clip(np.asarray(values, dtype=np.float64) / max(vmax, 1e-12), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _RAMP_X, _RAMP_RGB[:, c]) for c in range(3)], axis=-1)  # (H, W, 3)
    return np.round(rgb).astype(np.uint8)


def blend(image: Image.Image, colours: np.ndarray, alpha: float) -> Image.Image:
    """``(1 - alpha) * image + alpha * colours`` for an RGB image and a (H, W, 3) uint8 array."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = (1.0 - alpha) * base + alpha * colours.astype(np.float32)
    return Image.fromarray(np.round(out).astype(np.uint8))


@dataclass
class Panel:
    title: str
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the picture, below its title
    base: int | None  # the base shown; None for the input image
    share: float | None  # its share of the total responsibility mass


@dataclass
class AttentionGrid:
    image: Image.Image  # the whole figure
    panels: list[Panel]  # the input image first, then one per chosen base, heaviest first
    indices: np.ndarray  # chosen bases (k,)
    shares: np.ndarray  # their mass shares (k,)


def attention_grid(
    image: Image.Image,
    responsibilities: np.ndarray,
    *,
    align_corners: bool,
    padded_size: tuple[int, int] | None = None,
    num_bases: int = 6,
    columns: int = 4,
    panel_size: int = 256,
    alpha: float = 0.5,
) -> AttentionGrid:
    """The image, then one heat-map panel per top-mass base, titled ``base k: share%``.

    ``responsibilities`` (K, h, w) come from a forward of the image padded to ``padded_size`` (None: not
    padded) and are upsampled with the model's ``align_corners`` (``config.model.align_corners``). Heat maps
    share one colour scale, 0 to the largest responsibility shown, so panels compare. Every panel is the
    image scaled so that its longer side is ``panel_size`` pixels.
    """
    if columns < 1 or panel_size < 1:
        raise ValueError(f"columns and panel_size must be >= 1, got {columns}, {panel_size}")
    image = image.convert("RGB")
    size = (image.height, image.width)
    indices, shares = top_bases(responsibilities, num_bases)
    maps = upsample_maps(
        responsibilities, padded_size=padded_size or size, image_size=size, align_corners=align_corners
    )
    maps = maps[indices]  # (k, H, W), heaviest first
    vmax = float(maps.max()) if maps.size else 1.0

    scale = panel_size / max(size)
    pw, ph = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    pictures = [("image", image, None, None)]
    for k, share, m in zip(indices, shares, maps):
        overlay = blend(image, heatmap(m, vmax), alpha)
        pictures.append((f"base {int(k)}: {100 * share:.1f}%", overlay, int(k), float(share)))

    cols = min(columns, len(pictures))
    rows = -(-len(pictures) // cols)  # ceil
    cell_w, cell_h = pw + GAP, TITLE_HEIGHT + ph + GAP
    canvas = Image.new("RGB", (GAP + cols * cell_w, GAP + rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    panels = []
    for i, (title, picture, base, share) in enumerate(pictures):
        left = GAP + (i % cols) * cell_w
        top = GAP + (i // cols) * cell_h + TITLE_HEIGHT
        canvas.paste(picture.resize((pw, ph), Image.Resampling.BILINEAR), (left, top))
        draw.text((left, top - TITLE_HEIGHT), title, fill=(0, 0, 0), font=font)
        panels.append(Panel(title, (left, top, left + pw, top + ph), base, share))
    return AttentionGrid(canvas, panels, indices, shares)


def save_attention_arrays(
    path: str | Path,
    responsibilities: np.ndarray,
    indices: np.ndarray,
    shares: np.ndarray,
    *,
    image_size: tuple[int, int],
    padded_size: tuple[int, int],
) -> Path:
    """``.npz`` with the raw responsibilities (K, h, w) float32, the chosen bases and the sizes to map them,
    written atomically (``checkpoint.atomic_path``)."""
    path = Path(path)
    # an open file: numpy adds no .npz of its own, so the name is exactly ``path``
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            responsibilities=np.asarray(_check_resp(responsibilities), dtype=np.float32),
            indices=np.asarray(indices, dtype=np.int64),
            shares=np.asarray(shares, dtype=np.float64),
            image_size=np.asarray(image_size, dtype=np.int64),  # (H, W) of the input image
            padded_size=np.asarray(padded_size, dtype=np.int64),  # (Hp, Wp) the features were computed on
        )
    return path
