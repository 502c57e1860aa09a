"""The demo dataset: scenes whose object class is decided only by evidence spread over the whole image.

Each image holds 6-12 small blobs (squares or discs) of ONE object class c on a textured grey background.
Every blob pixel is ``object_gray + tint_strength * t_c + N(0, noise^2)`` per channel, where the t_c are
unit vectors at equally spaced hues in the chroma plane (orthogonal to grey). Blob vs background is easy
locally (different luminance and texture); WHICH object class is not, because the tint is buried in noise.

The arithmetic (defaults: tint_strength a = 0.03, noise sigma = 0.2, K = num_classes - 1 = 4 hues): two
neighbouring hues are d = 2 a sin(pi/K) = 0.042 apart; the mean of n pixels has noise sigma/sqrt(n) along
that direction, so they are told apart with margin z = d sqrt(n) / (2 sigma):
  one pixel (n = 1):             z = 0.11  -> chance
  one blob (8-14 px, n ~ 110):   z ~ 1.1   -> a weak guess (~27% wrong: 2 Phi(-1.1), two neighbouring hues)
  all blobs (~9 blobs, n ~ 1000): z ~ 3.4  -> decided (< 0.1% wrong)
SNR grows with sqrt(pixels averaged): a model must pool the object pixels of the whole image, which is
what EM attention's cluster means (bases) do, while a local window sees one blob at most.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .base import PairTransform, SegmentationDataset
from .palettes import Palette, index_image


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """How synthetic scenes are drawn: image size, classes, blobs and the colour cues."""

    image_size: int = 96  # square images, pixels
    num_classes: int = 5  # background + 4 object hues
    min_objects: int = 6  # blobs per image, drawn uniformly in [min_objects, max_objects]
    max_objects: int = 12
    min_size: int = 8  # blob side / diameter in pixels, uniform in [min_size, max_size]
    max_size: int = 14
    min_gap: int = 2  # free pixels between blobs (blobs never touch)
    disc_prob: float = 0.5  # chance that a blob is a disc rather than a square
    object_gray: float = 0.5  # object base luminance (0..1)
    tint_strength: float = 0.03  # a: length of the class tint in RGB (0..1 units)
    noise: float = 0.2  # sigma: per-pixel, per-channel Gaussian noise on object pixels
    tint_phase: float = 0.0  # rotation of the hue circle, radians
    hue_jitter: float = 0.0  # std (radians) of a per-object hue offset: each object alone is ambiguous
    colour_prob: float = 1.0  # chance that an object shows the class tint; the others are plain grey
    background_gray: float = 0.2  # background mean luminance
    background_texture: float = 0.08  # amplitude of the smooth grey background texture
    background_noise: float = 0.04  # per-pixel, per-channel noise on the background
    texture_waves: int = 3  # sinusoids summed for the background texture
    texture_min_period: float = 8.0  # their periods in pixels, uniform in [min, max]
    texture_max_period: float = 32.0

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + objects), got {self.num_classes}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        cells = self.grid**2
        if cells < self.max_objects:
            raise ValueError(
                f"a {self.image_size}px image fits only {cells} blobs of {self.max_size}px with gap "
                f"{self.min_gap}; lower max_objects/max_size or raise image_size"
            )

    @property
    def grid(self) -> int:
        """Blobs sit one per cell of a grid x grid layout (random cells, random offsets inside)."""
        return self.image_size // (self.max_size + self.min_gap)

    def hue(self, cls: int) -> float:
        """The hue angle of class ``cls`` (1 .. num_classes - 1)."""
        return self.tint_phase + 2 * math.pi * (cls - 1) / (self.num_classes - 1)

    @staticmethod
    def tint(theta: float) -> np.ndarray:
        """Unit RGB direction of hue ``theta`` in the chroma plane (orthogonal to grey)."""
        u = np.array([1.0, -1.0, 0.0]) / math.sqrt(2)
        v = np.array([1.0, 1.0, -2.0]) / math.sqrt(6)
        return math.cos(theta) * u + math.sin(theta) * v

    def tints(self) -> np.ndarray:
        """(num_classes, 3) unit tint directions; row 0 (background) is zero."""
        tints = np.zeros((self.num_classes, 3))
        for c in range(1, self.num_classes):
            tints[c] = self.tint(self.hue(c))
        return tints

    def render(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """One scene: (H, W, 3) uint8 image, (H, W) uint8 label, object class."""
        size = self.image_size
        cls = int(rng.integers(1, self.num_classes))
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        cell = self.max_size + self.min_gap
        margin = (size - self.grid * cell) // 2  # centre the grid
        cells = rng.choice(self.grid**2, size=n, replace=False)
        label = np.zeros((size, size), dtype=np.uint8)
        colour = np.zeros((size, size, 3))  # per-object tint
        yy, xx = np.mgrid[0:size, 0:size]
        for j, index in enumerate(cells):
            side = int(rng.integers(self.min_size, self.max_size + 1))
            disc = bool(rng.random() < self.disc_prob)
            top = margin + (index // self.grid) * cell + int(rng.integers(cell - self.min_gap - side + 1))
            left = margin + (index % self.grid) * cell + int(rng.integers(cell - self.min_gap - side + 1))
            if disc:
                cy, cx, r = top + (side - 1) / 2, left + (side - 1) / 2, side / 2
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = np.zeros((size, size), dtype=bool)
                mask[top : top + side, left : left + side] = True
            label[mask] = cls
            jitter = rng.normal(0, self.hue_jitter) if self.hue_jitter > 0 else 0.0
            shows_colour = j == 0 or self.colour_prob >= 1 or rng.random() < self.colour_prob  # >= 1 coloured
            if shows_colour:
                colour[mask] = self.tint(self.hue(cls) + jitter)

        texture = np.zeros((size, size))
        for _ in range(self.texture_waves):
            period = rng.uniform(self.texture_min_period, self.texture_max_period)
            angle, phase = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi)
            proj = xx * math.cos(angle) + yy * math.sin(angle)
            texture += np.sin(2 * math.pi * proj / period + phase)
        texture *= self.background_texture / max(1, self.texture_waves) ** 0.5
        background = self.background_gray + texture[..., None]
        background = background + rng.normal(0, self.background_noise, (size, size, 3))
        objects = self.object_gray + self.tint_strength * colour
        objects = objects + rng.normal(0, self.noise, (size, size, 3))
        image = np.where((label > 0)[..., None], objects, background)  # (H, W, 3)
        image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        return image, label, cls

    def palette(self) -> Palette:
        """Display colours: black background, then each class's tint."""
        colours = [(0, 0, 0)]
        for t in self.tints()[1:]:
            colours.append(tuple(int(round(255 * min(1.0, max(0.0, 0.5 + 0.55 * x)))) for x in t))
        return colours

    def class_names(self) -> list[str]:
        """``background``, then ``tint_1`` ...: one name per class."""
        return ["background"] + [f"tint_{c}" for c in range(1, self.num_classes)]


def _split_key(split: str) -> int:
    return zlib.crc32(split.encode())


class SyntheticContextDataset(SegmentationDataset):
    """Scenes generated on the fly, deterministic per (seed, split, index); see the module docstring.

    Scene keywords (``image_size``, ``num_classes``, ``tint_strength``, ``noise``, ...) are the fields of
    ``SceneConfig``. ``split`` selects an independent stream, so train and val never share scenes.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        length: int,
        seed: int = 0,
        transform: PairTransform | None = None,
        **scene,
    ):
        fields = {f.name for f in dataclasses.fields(SceneConfig)}
        unknown = sorted(set(scene) - fields)
        if unknown:
            raise TypeError(f"unknown synthetic scene parameters {unknown}; valid: {sorted(fields)}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.scene = SceneConfig(**scene)
        super().__init__(
            [],
            classes=self.scene.class_names(),
            palette=self.scene.palette(),
            transform=transform,
            seed=seed,
        )
        self.split = split
        self.length = length

    def __len__(self) -> int:
        return self.length

    def name(self, index: int) -> str:
        return f"{index:05d}"

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(image uint8 (H, W, 3), label uint8 (H, W), object class) of scene ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        rng = np.random.default_rng([self.seed, _split_key(self.split), index])
        return self.scene.render(rng)

    def read(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image, label, _ = self.generate(index)
        return Image.fromarray(image), label


def write_synthetic(root: str | Path, *, n_train: int, n_val: int, seed: int = 0, **scene) -> Path:
    """Write the set in the FolderDataset layout (images/<split>/NNNNN.png, masks as mode "P" PNGs,
    classes.txt, palette.txt, and scene.json with the parameters)."""
    root = Path(root)
    config = None
    for split, n in (("train", n_train), ("val", n_val)):
        if n <= 0:
            continue
        ds = SyntheticContextDataset(split, length=n, seed=seed, **scene)
        config = ds.scene
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label, _ = ds.generate(i)
            Image.fromarray(image).save(root / "images" / split / f"{ds.name(i)}.png")
            index_image(label, ds.palette).save(root / "masks" / split / f"{ds.name(i)}.png")
    config = config or SceneConfig(**scene)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(config.class_names()) + "\n")
    (root / "palette.txt").write_text("\n".join(" ".join(map(str, c)) for c in config.palette()) + "\n")
    meta = {"seed": seed, "n_train": n_train, "n_val": n_val, **dataclasses.asdict(config)}
    (root / "scene.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root
