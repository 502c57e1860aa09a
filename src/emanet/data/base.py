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

from emanet.errors import DataError

from .palettes import Palette, read_text_file
from .transforms import ToTensorNormalize

# A paired transform: (PIL image, uint8 label, rng) -> anything; the training ones end in tensors.
PairTransform = Callable[[Image.Image, np.ndarray, np.random.Generator], tuple]

# Image files the folder dataset and `emanet predict` pick up (lower-case suffixes)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# The kinds of data problem, shared by the error raised at training time and `emanet check-data`'s report.
KINDS = {
    "unreadable": "not an image file Pillow can decode",
    "truncated": "the file ends early (an interrupted copy or download)",
    "size_mismatch": "image and label sizes differ",
    "label_values": "label values outside 0..C-1 that are not the ignore index",
    "label_mode": "the label is not a single-channel 8-bit PNG (colour-coded, 16-bit, alpha)",
    "missing_pair": "an image without a label, a label without an image, or a listed id without files",
    "duplicate": "two files share a sample name",
    "empty_split": "the split has no samples",
    "layout": "a folder, class list or split list is missing",
    "num_classes": "the dataset's class count differs from model.num_classes",
    "dataset": "the dataset cannot be built (see the message)",
}


def decode_error(path: str | Path, what: str, error: BaseException) -> DataError:
    """A Pillow failure on ``path`` as a DataError: "truncated" when the file ends early, else "unreadable"."""
    text = str(error)
    if "truncated" in text.lower():  # Pillow words it differently in verify() and load(): one message for both
        return DataError(
            path,
            f"{what} file is truncated: it ends before its pixel data does; copy or download it again",
            kind="truncated",
            details={"pillow": text},
        )
    return DataError(path, f"cannot read {what} ({type(error).__name__}: {text})", kind="unreadable")


# What Pillow raises on a broken file: OSError (UnidentifiedImageError, "image file is truncated"),
# SyntaxError/ValueError from some decoders, DecompressionBombError for absurd sizes.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, applying its EXIF orientation (as viewers and phones do).

    The pixels are decoded here, so a truncated file raises ``DataError`` (kind "truncated") instead of
    coming back padded; that relies on ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` staying False (the default).
    """
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except FileNotFoundError:
        raise
    except DECODE_ERRORS as e:
        raise decode_error(path, "image", e) from e


LABEL_EXPECTED = "expected a single-channel 8-bit PNG (mode 'P' or 'L') whose pixel values are class indices"
COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV", "LAB")


def read_label(path: str | Path) -> np.ndarray:
    """Read a label PNG as a (H, W) uint8 array of class indices.

    Only single-channel 8-bit files are labels: mode "P" (palette; ``np.array`` gives the indices, never the
    colours) or "L". Colour, 16-bit or alpha files are rejected (kind "label_mode") rather than guessed at.
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
    except DECODE_ERRORS as e:
        raise decode_error(path, "label", e) from e
    raise label_mode_error(path, mode)


def label_mode_error(path: str | Path, mode: str) -> DataError:
    if mode in COLOUR_MODES:
        reason = (
            f"label is a colour image (mode {mode!r}): it looks like a colour-coded mask; {LABEL_EXPECTED}. "
            "Convert it to class indices with the dataset palette (emanet.data.colour_mask_to_index, "
            "see docs/check-data.md) and save it as a mode 'P' PNG (emanet.data.index_image)"
        )
    elif mode.startswith("I") or mode == "F":
        reason = (
            f"label is a 16/32-bit image (mode {mode!r}); {LABEL_EXPECTED} (0..254, 255 = ignore). If its values "
            "are class indices below 256, re-save it as 8-bit: "
            "Image.fromarray(np.array(Image.open(path)).astype(np.uint8)).save(path)"
        )
    elif mode in ("LA", "PA", "La"):
        reason = (
            f"label has an alpha channel (mode {mode!r}); {LABEL_EXPECTED}. Keep the index channel: "
            "Image.open(path).getchannel(0).save(path)"
        )
    else:
        reason = f"label has unsupported mode {mode!r}; {LABEL_EXPECTED}"
    return DataError(path, reason, kind="label_mode", details={"mode": mode})


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
        # problems tolerated while building (unpaired files dropped with strict=False), for check_dataset
        self.problems: list[DataError] = []

    @property
    def num_classes(self) -> int:
        """The number of classes (``len(classes)``)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        """A relative path without suffix (``2007_000032``, ``frankfurt/frankfurt_000000_000294``)."""
        if self._names is not None:
            return self._names[index]
        return self.samples[index][0].stem

    def reseed(self, seed: int) -> None:
        """Restart the augmentation generator (``worker_init_fn`` calls this in each worker)."""
        self.rng = np.random.default_rng(seed)

    def read(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The raw pair before transforms: PIL RGB image and (H, W) uint8 label (LUT applied, checked).

        Every problem raises ``DataError`` naming the file, with the same messages as ``emanet check-data``.
        """
        image_path, label_path = self.samples[index]
        image = _read_listed(read_image, image_path)
        if label_path is None:
            return image, np.full((image.height, image.width), self.ignore_index, dtype=np.uint8)
        label = _read_listed(read_label, label_path)
        self.check_size(image, label, image_path, label_path)
        return image, self.map_label(label, label_path)

    def check_size(self, image: Image.Image, label: np.ndarray, image_path, label_path) -> None:
        """Raise DataError (kind ``size_mismatch``) unless label and image have the same size."""
        if label.shape != (image.height, image.width):
            raise DataError(
                label_path,
                f"label is {label.shape[1]}x{label.shape[0]} (WxH) but its image {image_path} is "
                f"{image.width}x{image.height}; image and label must have the same size",
                kind="size_mismatch",
                details={"image_size": [image.width, image.height], "label_size": [label.shape[1], label.shape[0]]},
            )

    def map_label(self, label: np.ndarray, path: str | Path) -> np.ndarray:
        """Apply the label LUT (if any) and check the range; errors quote the values as stored in the file."""
        mapped = label if self.lut is None else self.lut[label]
        self.check_label(mapped, path, raw=None if self.lut is None else label)
        return mapped

    def check_label(self, label: np.ndarray, path: str | Path, raw: np.ndarray | None = None) -> None:
        """Raise ``DataError`` naming the file (with the bad values and their pixel counts) if a value is
        >= num_classes and not the ignore index. ``raw``: the file's values before the LUT, for the message."""
        bad = (label >= self.num_classes) & (label != self.ignore_index)
        if not bad.any():
            return
        values, counts = np.unique(label[bad], return_counts=True)
        reason = f"label values {values.tolist()}"
        details = {"values": values.tolist(), "counts": counts.tolist()}
        if raw is not None:
            raw_values, raw_counts = np.unique(raw[bad], return_counts=True)
            reason = f"label file values {raw_values.tolist()} (after the dataset's label mapping: {values.tolist()})"
            details = {"values": raw_values.tolist(), "counts": raw_counts.tolist(), "mapped": values.tolist()}
            counts = raw_counts
        raise DataError(
            path,
            f"{reason} on {counts.tolist()} pixels are out of range for {self.num_classes} classes "
            f"(valid: 0..{self.num_classes - 1}, {self.ignore_index} = ignore)",
            kind="label_values",
            details=details,
        )

    def __getitem__(self, index: int):
        image, label = self.read(index)
        if self.transform is None:
            return ToTensorNormalize()(image, label, self.rng)
        return self.transform(image, label, self.rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)}, num_classes={self.num_classes})"


def _read_listed(reader, path: Path):
    """A listed file that has disappeared since the dataset was built is a DataError too (skippable)."""
    try:
        return reader(path)
    except FileNotFoundError as e:
        raise DataError(
            path, f"file not found ({e.strerror}); it was listed when the dataset was built", kind="missing_pair"
        ) from e


def reseedable_datasets(dataset) -> list:
    """The datasets inside ``dataset`` (itself, Subset.dataset, ConcatDataset.datasets, our wrappers) whose
    class defines ``reseed``: the ones holding an augmentation generator. Wrappers that merely forward
    attributes are looked through, not counted."""
    found, stack, seen = [], [dataset], set()
    while stack:
        ds = stack.pop()
        if id(ds) in seen:
            continue
        seen.add(id(ds))
        if callable(getattr(type(ds), "reseed", None)):
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
    for ds in reseedable_datasets(info.dataset):
        ds.reseed(seed)


class SkipBadSamples(Dataset):
    """Opt-in skip-and-count: a sample whose files raise ``DataError`` is replaced by the next one.

    For index i that fails, ``path<TAB>reason`` is appended to ``log_path`` (opened in append mode for each
    line, so DataLoader workers can share the file and nothing already written is lost), ``skipped`` grows by
    one (a count for this process: each worker keeps its own) and index (i + 1) % len is tried, then the
    next, deterministically. After ``max_tries`` samples in a row (the requested one included) fail, the
    last error is raised as a ``DataError`` saying so: a dataset that bad needs ``emanet check-data``.
    """

    def __init__(self, dataset, log_path: str | Path | None = None, max_tries: int = 16):
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.dataset = dataset
        self.log_path = None if log_path is None else Path(log_path)
        self.max_tries = max_tries
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # classes, palette, name(), ... of the wrapped dataset
        if name == "dataset":  # not set yet (unpickling): avoid recursing into ourselves
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def log(self, error: DataError) -> None:
        """Count a skipped sample and append ``path<TAB>reason`` to ``log_path``."""
        self.skipped += 1
        if self.log_path is not None:
            reason = " ".join(error.reason.split())  # one line per sample, tabs and newlines flattened
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(f"{error.path}\t{reason}\n")

    def __getitem__(self, index: int):
        n = len(self.dataset)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        i = index % n
        for _ in range(min(self.max_tries, n)):
            try:
                return self.dataset[i]
            except DataError as e:
                self.log(e)
                error = e
            i = (i + 1) % n
        raise DataError(
            error.path,
            f"too many consecutive bad samples: {min(self.max_tries, n)} in a row from index {index} failed "
            f"(max_tries={self.max_tries}); the last: {error.reason}. Run `emanet check-data` on this dataset",
            kind=error.kind,
            details=error.details,
        ) from error

    def __repr__(self) -> str:
        return f"SkipBadSamples({self.dataset!r}, skipped={self.skipped})"


def find_images(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Files under ``folder`` (recursively) with one of ``suffixes`` (case-insensitive), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; expected the layout {layout}")
    return path


def read_split_file(path: Path) -> list[str]:
    """Ids from a split list: first token per line, reduced to its stem ('JPEGImages/x.jpg ...' works)."""
    ids = [Path(line.split()[0]).stem for line in read_text_file(path).splitlines() if line.strip()]
    if not ids:
        raise DataError(path, "split list is empty; expected one image id per line", kind="empty_split")
    return ids


def missing_files_error(what: str, missing: Sequence[Path], where: str) -> FileNotFoundError:
    names = [str(p) for p in missing]
    return FileNotFoundError(f"{len(names)} {what} not found ({where}): {_describe_names(names)}")


def unpaired_error(image: Path, label: Path, source: str) -> DataError:
    """The "missing_pair" problem for an expected (image, label) pair where one or both files are absent."""
    if not image.is_file() and not label.is_file():
        return DataError(image, f"{source}: neither the image nor its label {label} exists", kind="missing_pair")
    if not label.is_file():
        return DataError(image, f"image without a label: {label} not found ({source})", kind="missing_pair")
    return DataError(label, f"label without an image: {image} not found ({source})", kind="missing_pair")
