"""Scan a dataset for the problems that stop training or silently spoil it (``emanet check-data``).

Each sample's image and label are structurally verified (``PIL.Image.verify``: PNG chunk CRCs, JPEG
markers) and then fully decoded with the same readers and checks training uses, so every problem reported
here is one that ``SegmentationDataset.read`` would raise, with the same message and ``DataError.kind``.
Problems found while building the dataset (unpaired files, missing folders, an empty split) become report
entries too: loaders are built with ``strict=False`` and a loader that still cannot be built gives a
single entry instead of a traceback.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from emanet.errors import DataError
from emanet.progress import progress_bar

from .base import (
    COLOUR_MODES,
    DECODE_ERRORS,
    KINDS,
    SegmentationDataset,
    decode_error,
    read_image,
    read_label,
)
from .datasets import build_dataset
from .palettes import Palette


def verify_file(path: str | Path, what: str = "image") -> None:
    """Pillow's structural check without decoding the pixels; raises ``DataError`` naming the file."""
    try:
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        raise
    except DECODE_ERRORS as e:
        raise decode_error(path, what, e) from e


@contextlib.contextmanager
def strict_decoding():
    """Decode with ``LOAD_TRUNCATED_IMAGES`` off even if another library switched it on globally (truncated
    files must raise, not come back padded with grey); yields whether it had been on."""
    was = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield was
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = was


def colour_mask_to_index(rgb: np.ndarray, palette: Palette) -> np.ndarray:
    """A colour-coded mask (H, W, 3) uint8 -> (H, W) uint8 class indices, by exact palette colour.

    A colour used by several palette entries maps to the first. Colours not in the palette are an error
    listing them (pass them through a LUT first if your masks mark "ignore" in a colour of their own).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    lookup: dict[int, int] = {}
    for index, (r, g, b) in enumerate(palette[:256]):
        lookup.setdefault((int(r) << 16) | (int(g) << 8) | int(b), index)
    colours, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(c) for c in colours if int(c) not in lookup]
    if unknown:
        shown = ", ".join(str(((c >> 16) & 255, (c >> 8) & 255, c & 255)) for c in unknown[:8])
        raise ValueError(f"{len(unknown)} colour(s) are not in the palette: {shown}")
    return np.array([lookup[int(c)] for c in colours], dtype=np.uint8)[inverse.reshape(codes.shape)]


def describe_label_mode(path: str | Path, palette: Palette) -> str:
    """A sentence about a rejected label's content: do its colours match the palette, do its values fit 8 bits."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in COLOUR_MODES:
                rgb = np.asarray(img.convert("RGB"))
                colours = np.unique(rgb.reshape(-1, 3), axis=0)
                try:
                    classes = np.unique(colour_mask_to_index(colours[None], palette)).tolist()
                except ValueError as e:
                    return f"It does not match this dataset's palette ({e})."
                return (
                    f"All its {len(colours)} colours are in this dataset's palette (classes {classes}): "
                    "colour_mask_to_index converts it exactly."
                )
            if mode.startswith("I") or mode == "F":
                values = np.asarray(img)
                low, high = values.min().item(), values.max().item()
                if low >= 0 and high <= 255 and np.array_equal(values, np.round(values)):
                    return f"Its values are {low}..{high}: they fit 8 bits, re-saving as 8-bit keeps them."
                return f"Its values are {low}..{high}: they do not fit 8 bits, so they are not class indices."
    except DECODE_ERRORS:
        pass
    return ""


@dataclass
class Problem:
    """One problem found in a dataset: its kind (a key of KINDS), the file and what is wrong."""

    kind: str  # a key of KINDS
    path: str
    message: str  # what is wrong, without the path
    sample: str | None = None  # the dataset's name for the sample, when it has one
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_error(cls, error: DataError, sample: str | None = None) -> Problem:
        """The problem a DataError describes."""
        return cls(error.kind, error.path, error.reason, sample, dict(error.details))

    def __str__(self) -> str:
        return f"[{self.kind}] {self.path}: {self.message}"


@dataclass
class Report:
    """One split's findings. ``ok`` is True when no problem was found."""

    dataset: str
    split: str
    root: str | None = None
    num_samples: int = 0  # samples the dataset holds (after unpaired files were dropped)
    samples_scanned: int = 0
    files_scanned: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def counts(self) -> dict[str, int]:
        """Problems per kind, most frequent first."""
        return dict(Counter(p.kind for p in self.problems).most_common())

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, with ``ok`` and the counts per kind."""
        return {**asdict(self), "ok": self.ok, "counts": self.counts()}

    def summary(self) -> str:
        """One line: what was scanned and the problems per kind."""
        where = f" ({self.root})" if self.root else ""
        head = (
            f"{self.dataset} {self.split}{where}: {self.samples_scanned} of {self.num_samples} samples scanned, "
            f"{self.files_scanned} files"
        )
        if self.ok:
            return f"{head}; no problems"
        kinds = ", ".join(f"{kind} {n}" for kind, n in self.counts().items())
        return f"{head}; {len(self.problems)} problem(s): {kinds}"

    def format(self, limit: int | None = 50) -> str:
        """The summary, notes and problems (the first ``limit``; None: all), one per line."""
        lines = [self.summary(), *(f"  note: {n}" for n in self.notes)]
        shown = self.problems if limit is None else self.problems[:limit]
        lines += [f"  {p}" for p in shown]
        if len(shown) < len(self.problems):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more (--json writes them all)")
        return "\n".join(lines)


def _scan_pair(ds: SegmentationDataset, index: int, problems: list[Problem]) -> int:
    """Check sample ``index`` file by file (so a bad image does not hide a bad label); returns files read."""
    image_path, label_path = ds.samples[index]
    sample = ds.name(index)
    image = label = None
    files = 0
    for path, reader, what in ((image_path, read_image, "image"), (label_path, read_label, "label")):
        if path is None:
            continue
        files += 1
        try:
            verify_file(path, what)
            loaded = reader(path)
        except FileNotFoundError as e:
            problems.append(Problem("missing_pair", str(path), f"file not found ({e.strerror})", sample))
            continue
        except DataError as e:
            problem = Problem.from_error(e, sample)
            if e.kind == "label_mode":
                extra = describe_label_mode(path, ds.palette)
                problem.message += f". {extra}" if extra else ""
            problems.append(problem)
            continue
        if what == "image":
            image = loaded
        else:
            label = loaded
    if image is not None and label is not None:
        try:
            ds.check_size(image, label, image_path, label_path)
            ds.map_label(label, label_path)
        except DataError as e:
            problems.append(Problem.from_error(e, sample))
    return files


def check_dataset(
    dataset,
    *,
    max_files: int | None = None,
    num_classes: int | None = None,
    progress: bool = False,
    name: str | None = None,
    split: str | None = None,
) -> Report:
    """Scan ``dataset`` (a ``SegmentationDataset``, built without transforms) and report every problem.

    ``max_files``: scan only the first N samples (an image and its label each). ``num_classes``: the
    model's class count, reported if it differs from the dataset's.
    """
    report = Report(
        dataset=name or type(dataset).__name__,
        split=split or str(getattr(dataset, "split", "?")),
        root=None if getattr(dataset, "root", None) is None else str(dataset.root),
        num_samples=len(dataset),
    )
    report.problems += [Problem.from_error(e) for e in getattr(dataset, "problems", ())]
    ds_classes = getattr(dataset, "num_classes", None)
    if num_classes is not None and ds_classes is not None and ds_classes != num_classes:
        report.problems.append(
            Problem(
                "num_classes",
                report.root or report.dataset,
                f"the dataset has {ds_classes} classes but model.num_classes is "
                f"{num_classes}; set model.num_classes={ds_classes}",
            )
        )
    if len(dataset) == 0:
        report.problems.append(Problem("empty_split", report.root or report.dataset, "the split has no samples"))
        return report
    n = len(dataset) if max_files is None else min(len(dataset), max_files)
    paired = isinstance(dataset, SegmentationDataset) and len(dataset.samples) == len(dataset)
    bar = None
    if progress:
        bar = progress_bar(total=n, desc=f"check {report.split}", unit="sample")
    with strict_decoding() as was_lenient:
        if was_lenient:
            report.notes.append(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was True (set by another library): it was "
                "turned off for this scan, but training in this process would pad truncated "
                "files silently"
            )
        for i in range(n):
            if paired:
                report.files_scanned += _scan_pair(dataset, i, report.problems)
            else:  # generated or wrapped datasets: whatever read() raises
                try:
                    dataset.read(i)
                except DataError as e:
                    report.problems.append(Problem.from_error(e, str(i)))
            report.samples_scanned += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return report


def check_split(
    dataset: str,
    *,
    root: str | Path | None,
    split: str,
    options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Report:
    """Build ``build_dataset(dataset, root, split, **options)`` without transforms (unpaired files tolerated)
    and ``check_dataset`` it; a dataset that cannot be built gives a report with that one problem."""
    options = dict(options or {})
    where = dataset if root is None else str(root)
    if dataset != "synthetic":
        options["strict"] = False
    try:
        ds = build_dataset(dataset, root=root, split=split, **options)
    except DataError as e:
        problem = Problem.from_error(e)
    except FileNotFoundError as e:
        problem = Problem("layout", where, str(e))
    except (ValueError, TypeError) as e:  # unknown split names, bad options, empty class lists, ...
        problem = Problem("dataset", where, str(e))
    else:
        return check_dataset(ds, name=dataset, split=split, **kwargs)
    return Report(dataset=dataset, split=split, root=None if root is None else str(root), problems=[problem])


def check_data_config(
    data, *, splits: Sequence[str] = ("train", "val"), num_classes: int | None = None, **kwargs: Any
) -> list[Report]:
    """Check the splits of a ``DataConfig`` ("train" -> ``data.train_split``, "val" -> ``data.val_split``),
    with the dataset options training uses (synthetic: ``length`` / ``val_length``)."""
    reports = []
    for which in splits:
        if which not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {which!r}")
        options = dict(data.options)
        root = data.root
        if data.dataset == "synthetic":  # generated: lengths per split instead of folders (as training)
            val_length = options.pop("val_length", 200)
            if which == "val":
                options["length"] = val_length
            root = None
        split = data.train_split if which == "train" else data.val_split
        reports.append(
            check_split(data.dataset, root=root, split=split, options=options, num_classes=num_classes, **kwargs)
        )
    return reports


__all__ = [
    "KINDS",
    "Problem",
    "Report",
    "check_data_config",
    "check_dataset",
    "check_split",
    "colour_mask_to_index",
    "describe_label_mode",
    "strict_decoding",
    "verify_file",
]
