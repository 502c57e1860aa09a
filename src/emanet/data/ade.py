"""ADE20K SceneParsing (ADEChallengeData2016, 150 classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import PairTransform, SegmentationDataset, missing_files_error, require_dir
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
    """ADE20K with "reduce zero label". ``root`` is ADEChallengeData2016 or the folder that holds it."""

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        *,
        transform: PairTransform | None = None,
        seed: int = 0,
    ):
        if split not in ADE_SPLITS:
            raise ValueError(f"ADE20K split must be one of {sorted(ADE_SPLITS)}, got {split!r}")
        folder = ADE_SPLITS[split]
        root = Path(root)
        base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
        image_dir = require_dir(base / "images" / folder, ADE_LAYOUT)
        label_dir = require_dir(base / "annotations" / folder, ADE_LAYOUT)
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not images:
            raise ValueError(f"no images in {image_dir}; expected {ADE_LAYOUT}")
        labels = [label_dir / f"{p.stem}.png" for p in images]
        missing = [p for p in labels if not p.is_file()]
        if missing:
            raise missing_files_error("annotations", missing, f"one PNG per image of {image_dir}")
        super().__init__(
            list(zip(images, labels)),
            classes=ADE20K_CLASSES,
            palette=ADE20K_PALETTE,
            lut=reduce_zero_label_lut(),
            transform=transform,
            seed=seed,
        )
        self.root = base
        self.split = folder
