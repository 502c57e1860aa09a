"""Cityscapes fine annotations (19 evaluated classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emanet.errors import DataError

from .base import PairTransform, SegmentationDataset, missing_files_error, require_dir, unpaired_error
from .palettes import CITYSCAPES_CLASSES, CITYSCAPES_EVAL_LABEL_IDS, CITYSCAPES_PALETTE

CITYSCAPES_LAYOUT = (
    "ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
    "ROOT/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png)"
)


def cityscapes_label_lut(ignore_index: int = 255) -> np.ndarray:
    """labelIds -> trainIds: the 19 evaluated ids map to 0..18, every other value to ``ignore_index``."""
    lut = np.full(256, ignore_index, dtype=np.uint8)
    for train_id, label_id in enumerate(CITYSCAPES_EVAL_LABEL_IDS):
        lut[label_id] = train_id
    return lut


class CityscapesDataset(SegmentationDataset):
    """Pairs leftImg8bit images with gtFine labels.

    Uses ``*_gtFine_labelTrainIds.png`` (made by cityscapesScripts) when every image has one, otherwise the
    raw ``*_gtFine_labelIds.png`` mapped to train ids with a lookup table. The "test" split, whose labels are
    not public, may have no gtFine folder; its masks read as all-ignore. ``strict=False`` drops images
    without labels and records them, and labels without images, in ``problems`` (``emanet check-data``).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transform: PairTransform | None = None,
        seed: int = 0,
        strict: bool = True,
    ):
        root = Path(root)
        image_dir = require_dir(root / "leftImg8bit" / split, CITYSCAPES_LAYOUT)
        images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise DataError(
                image_dir,
                f"split {split!r} is empty: no */*_leftImg8bit.png images; expected {CITYSCAPES_LAYOUT}",
                kind="empty_split",
            )
        stems = [p.name[: -len("_leftImg8bit.png")] for p in images]
        names = [f"{p.parent.name}/{s}" for p, s in zip(images, stems)]
        label_dir = root / "gtFine" / split
        problems: list[DataError] = []
        if not label_dir.is_dir() and split == "test":
            labels, lut = [None] * len(images), None
        else:
            require_dir(label_dir, CITYSCAPES_LAYOUT)
            train_ids = [label_dir / f"{n}_gtFine_labelTrainIds.png" for n in names]
            label_ids = [label_dir / f"{n}_gtFine_labelIds.png" for n in names]
            unlabelled = [
                k for k, (p, q) in enumerate(zip(train_ids, label_ids)) if not p.is_file() and not q.is_file()
            ]
            if unlabelled and not strict:  # drop them, then pick the label kind among the rest
                problems = [unpaired_error(images[k], train_ids[k], "or _labelIds.png") for k in unlabelled]
                keep = [k for k in range(len(images)) if k not in set(unlabelled)]
                images, names = [images[k] for k in keep], [names[k] for k in keep]
                train_ids, label_ids = [train_ids[k] for k in keep], [label_ids[k] for k in keep]
                unlabelled = []
            if not strict:
                problems += self._orphan_labels(label_dir, image_dir, set(names))
            labels, lut = _label_files(label_dir, train_ids, label_ids, unlabelled)
        super().__init__(
            list(zip(images, labels)),
            classes=CITYSCAPES_CLASSES,
            palette=CITYSCAPES_PALETTE,
            lut=lut,
            transform=transform,
            names=names,
            seed=seed,
        )
        self.problems = problems
        self.root = root
        self.split = split

    @staticmethod
    def _orphan_labels(label_dir: Path, image_dir: Path, names: set[str]) -> list[DataError]:
        found, seen = [], set(names)
        for suffix in ("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png"):
            for path in sorted(label_dir.glob(f"*/*{suffix}")):
                name = f"{path.parent.name}/{path.name[: -len(suffix)]}"
                if name not in seen:  # one report per name, even with both label kinds
                    seen.add(name)
                    found.append(unpaired_error(image_dir / f"{name}_leftImg8bit.png", path, "paired by name"))
        return found


def _label_files(
    label_dir: Path, train_ids: list[Path], label_ids: list[Path], unlabelled: list[int]
) -> tuple[list[Path], np.ndarray | None]:
    """The labelTrainIds files when every image has one, else the labelIds files with their lookup table;
    a split where neither kind is complete raises, naming what is missing."""
    if all(p.is_file() for p in train_ids):
        return train_ids, None
    if all(p.is_file() for p in label_ids):
        return label_ids, cityscapes_label_lut()
    if not unlabelled:
        missing = [p for p in train_ids if not p.is_file()]
        raise FileNotFoundError(
            f"{label_dir} has labelTrainIds for some images and only labelIds for others; "
            "run cityscapesScripts' createTrainIdLabelImgs for the whole split or remove the "
            f"partial labelTrainIds files (missing e.g. {missing[0]})"
        )
    raise missing_files_error(
        "label files",
        [train_ids[k] for k in unlabelled],
        "each image needs <name>_gtFine_labelTrainIds.png or _labelIds.png",
    )
