"""ADE20K SceneParsing (ADEChallengeData2016, 150 classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emanet.errors import DataError

from .base import PairTransform, SegmentationDataset, missing_files_error, require_dir, unpaired_error
from .palettes import ADE20K_CLASSES, ADE20K_PALETTE

ADE_LAYOUT = "ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}/*.jpg|*.png"
ADE_SPLITS = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}


def reduce_zero_label_lut(ignore_index: int = 255) -> np.ndarray:
    """0 ("other") -> ignore, x -> x - 1, so the 150 classes become 0..149 (add 1 back for benchmark PNGs)."""
    lut = np.arange(256, dtype=np.int64) - 1
    lut[0] = ignore_index
    lut[255] = ignore_index
    return lut.astype(np.uint8)


class ADE20KDataset(SegmentationDataset):
    """ADE20K with "reduce zero label". ``root`` is ADEChallengeData2016 or the folder that holds it.

    ``strict=False`` drops images without annotations and records them, and annotations without images,
    in ``problems`` (``emanet check-data``); the default raises, listing them.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        *,
        transform: PairTransform | None = None,
        seed: int = 0,
        strict: bool = True,
    ):
        if split not in ADE_SPLITS:
            reason = f"ADE20K split must be one of {sorted(ADE_SPLITS)}, got {split!r}"
            raise DataError(root, reason, kind="dataset")
        folder = ADE_SPLITS[split]
        root = Path(root)
        base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
        image_dir = require_dir(base / "images" / folder, ADE_LAYOUT)
        label_dir = require_dir(base / "annotations" / folder, ADE_LAYOUT)
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not images:
            raise DataError(
                image_dir, f"split {split!r} is empty: no images; expected {ADE_LAYOUT}", kind="empty_split"
            )
        labels = [label_dir / f"{p.stem}.png" for p in images]
        missing = {p for p in labels if not p.is_file()}
        if missing and strict:
            raise missing_files_error("annotations", sorted(missing), f"one PNG per image of {image_dir}")
        problems = [unpaired_error(img, lbl, "paired by name") for img, lbl in zip(images, labels) if lbl in missing]
        if not strict:
            stems = {p.stem for p in images}
            orphans = sorted(p for p in label_dir.glob("*.png") if p.stem not in stems)
            problems += [unpaired_error(image_dir / f"{p.stem}.jpg", p, "paired by name") for p in orphans]
        super().__init__(
            [(img, lbl) for img, lbl in zip(images, labels) if lbl not in missing],
            classes=ADE20K_CLASSES,
            palette=ADE20K_PALETTE,
            lut=reduce_zero_label_lut(),
            transform=transform,
            seed=seed,
        )
        self.problems = problems
        self.root = base
        self.split = folder
