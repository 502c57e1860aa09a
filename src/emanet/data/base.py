"""The dataset base class shared by every reader: file pairs in, ``(image, mask)`` out.

Reading is split from augmentation. ``read(i)`` returns the raw pair (a PIL RGB image and a uint8 label array,
after the label lookup table and a range check); ``__getitem__`` runs the paired transform with the
dataset's own ``np.random.Generator``, which ``worker_init_fn`` re-seeds in every DataLoader worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .palettes import Palette
from .transforms import ToTensorNormalize

# A paired transform: (PIL image, uint8 label, rng) -> anything; the training ones end in tensors.
PairTransform = Callable[[Image.Image, np.ndarray, np.random.Generator], tuple]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataError(ValueError):
    """A problem with one data file; ``path`` names it so callers can report or skip it."""

    def __init__(self, path: str | Path, message: str):
        super().__init__(f"{path}: {message}")
        self.path = str(path)


def read_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, applying its EXIF orientation (as viewers and phones do)."""
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot read image ({e})") from e


def read_label(path: str | Path) -> np.ndarray:
    """Read a label PNG as a (H, W) uint8 array of class indices.

    Only single-channel 8-bit files are labels: mode "P" (palette; ``np.array`` gives the indices, never the
    colours) or "L". Colour or 16-bit files are rejected rather than guessed at.
    """
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            mode = img.mode
            if mode in ("P", "L"):
                return np.array(img, dtype=np.uint8)
            img.load()
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot read label ({e})") from e
    expected = "expected a single-channel 8-bit PNG (mode 'P' or 'L') whose pixel values are class indices"
    if mode in ("RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "HSV"):
        raise DataError(
            path,
            f"label is a colour image (mode {mode!r}); {expected}. Convert colour-coded masks to indices "
            "with the dataset palette first.",
        )
    if mode.startswith("I") or mode == "F":
        raise DataError(path, f"label is a 16/32-bit image (mode {mode!r}); {expected} (0..254, 255 = ignore)")
    raise DataError(path, f"label has unsupported mode {mode!r}; {expected}")


def _describe_names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


class SegmentationDataset(Dataset):
    """(image_path, label_path or None) pairs with class names, a palette and an optional label LUT.

    ``__getitem__(i)`` returns ``transform(image, label, self.rng)``; with no transform, a float tensor
    (3, H, W) normalised with the ImageNet mean/std and an int64 tensor (H, W). A sample without a label file
    reads as a mask full of ``ignore_index``.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str | Path, str | Path | None]],
        *,
        classes: Sequence[str],
        palette: Palette,
        ignore_index: int = 255,
        lut: np.ndarray | None = None,
        transform: PairTransform | None = None,
        names: Sequence[str] | None = None,
        seed: int = 0,
    ):
        self.samples = [(Path(img), None if lbl is None else Path(lbl)) for img, lbl in samples]
        self.classes = tuple(classes)
        self.palette = [tuple(int(v) for v in rgb) for rgb in palette]
        if len(self.palette) < self.num_classes:
            raise ValueError(f"palette has {len(self.palette)} colours for {self.num_classes} classes")
        self.ignore_index = ignore_index
        if lut is not None:
            lut = np.asarray(lut)
            if lut.shape != (256,):
                raise ValueError(f"label LUT must have 256 entries, got shape {lut.shape}")
            lut = lut.astype(np.uint8)
        self.lut = lut
        self.transform = transform
        self._names = None if names is None else list(names)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        """A relative path without suffix (``2007_000032``, ``frankfurt/frankfurt_000000_000294``)."""
        if self._names is not None:
            return self._names[index]
        return self.samples[index][0].stem

    def has_label(self, index: int) -> bool:
        return self.samples[index][1] is not None

    def reseed(self, seed: int) -> None:
        """Restart the augmentation generator (``worker_init_fn`` calls this in each worker)."""
        self.rng = np.random.default_rng(seed)

    def read(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The raw pair before transforms: PIL RGB image and (H, W) uint8 label (LUT applied, checked)."""
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        if label_path is None:
            return image, np.full((image.height, image.width), self.ignore_index, dtype=np.uint8)
        label = read_label(label_path)
        if label.shape != (image.height, image.width):
            raise DataError(
                label_path,
                f"label is {label.shape[1]}x{label.shape[0]} (WxH) but its image {image_path} is "
                f"{image.width}x{image.height}; image and label must have the same size",
            )
        if self.lut is not None:
            label = self.lut[label]
        self.check_label(label, label_path)
        return image, label

    def check_label(self, label: np.ndarray, path: str | Path) -> None:
        """Raise ``DataError`` naming the file if a value is >= num_classes and not the ignore index."""
        bad = (label >= self.num_classes) & (label != self.ignore_index)
        if bad.any():
            values = np.unique(label[bad]).tolist()
            raise DataError(
                path,
                f"label values {values} are out of range for {self.num_classes} classes "
                f"(valid: 0..{self.num_classes - 1}, {self.ignore_index} = ignore)",
            )

    def __getitem__(self, index: int):
        image, label = self.read(index)
        if self.transform is None:
            return ToTensorNormalize()(image, label, self.rng)
        return self.transform(image, label, self.rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)}, num_classes={self.num_classes})"


def _find_datasets(dataset) -> list:
    """The dataset plus anything it wraps (Subset.dataset, ConcatDataset.datasets)."""
    found, stack = [], [dataset]
    while stack:
        ds = stack.pop()
        found.append(ds)
        if hasattr(ds, "dataset"):
            stack.append(ds.dataset)
        stack.extend(getattr(ds, "datasets", ()))
    return found


def worker_init_fn(worker_id: int) -> None:
    """DataLoader hook: give each worker's dataset its own augmentation generator.

    ``torch.initial_seed()`` inside a worker is the loader's per-iterator base seed + worker_id, so workers
    differ from each other and from one epoch to the next, and a seeded torch makes the whole run repeatable.
    """
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    seed = torch.initial_seed()
    for ds in _find_datasets(info.dataset):
        if isinstance(ds, SegmentationDataset):
            ds.reseed(seed)


def find_images(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Files under ``folder`` (recursively) with one of ``suffixes`` (case-insensitive), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; expected the layout {layout}")
    return path


def read_split_file(path: Path) -> list[str]:
    """Ids from a split list: first token per line, reduced to its stem ('JPEGImages/x.jpg ...' works)."""
    ids = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split list {path} is empty")
    return ids


def missing_files_error(what: str, missing: Sequence[Path], where: str) -> FileNotFoundError:
    names = [str(p) for p in missing]
    return FileNotFoundError(f"{len(names)} {what} not found ({where}): {_describe_names(names)}")
