"""PASCAL VOC 2012 (optionally with the SBD "trainaug" labels)."""

from __future__ import annotations

from pathlib import Path

from .base import PairTransform, SegmentationDataset, missing_files_error, read_split_file, unpaired_error
from .palettes import VOC_CLASSES, VOC_PALETTE

VOC_LAYOUT = (
    "ROOT/VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, "
    "ImageSets/Segmentation/{train,val,trainval}.txt} (SBD: SegmentationClassAug/*.png and "
    "ImageSets/Segmentation/train_aug.txt)"
)
AUG_SPLITS = ("train_aug", "trainaug")


def find_voc_root(root: str | Path) -> Path:
    """Accept the folder holding VOCdevkit, VOCdevkit itself, or VOCdevkit/VOC2012."""
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(f"no VOC2012 folder with JPEGImages/ found under {root}; expected {VOC_LAYOUT}")


class VOCDataset(SegmentationDataset):
    """VOC 2012 segmentation: 21 classes, 255 = void (the object borders).

    ``aug=True`` reads labels from SegmentationClassAug (the SBD-augmented set); split "train_aug" (or
    "trainaug") implies it and reads the 10,582-id list ImageSets/Segmentation/train_aug.txt.
    ``strict=False`` drops listed ids whose files are missing and records them in ``problems``
    (``emanet check-data``); the default raises, listing them.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        aug: bool = False,
        transform: PairTransform | None = None,
        seed: int = 0,
        strict: bool = True,
    ):
        base = find_voc_root(root)
        aug = aug or split in AUG_SPLITS
        lists = base / "ImageSets" / "Segmentation"
        if split in AUG_SPLITS:
            candidates = [lists / "train_aug.txt", lists / "trainaug.txt"]
            list_file = next((p for p in candidates if p.is_file()), None)
            if list_file is None:
                raise FileNotFoundError(
                    f"neither {candidates[0]} nor {candidates[1]} exists: place the SBD 'trainaug' list of "
                    "10,582 image ids (one per line) there, next to train.txt and val.txt"
                )
        else:
            list_file = lists / f"{split}.txt"
            if not list_file.is_file():
                available = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
                raise FileNotFoundError(
                    f"split list {list_file} not found (available: {available or 'none'}); expected {VOC_LAYOUT}"
                )
        label_dir = base / ("SegmentationClassAug" if aug else "SegmentationClass")
        if not label_dir.is_dir():
            hint = " (the SBD-augmented labels)" if aug else ""
            raise FileNotFoundError(f"label folder {label_dir}{hint} not found; expected {VOC_LAYOUT}")
        ids = read_split_file(list_file)
        samples = [(base / "JPEGImages" / f"{i}.jpg", label_dir / f"{i}.png") for i in ids]
        missing = [p for pair in samples for p in pair if not p.is_file()]
        if missing and strict:
            raise missing_files_error("files", missing, f"ids listed in {list_file}")
        problems = [
            unpaired_error(img, lbl, f"id {name!r} listed in {list_file.name}")
            for name, (img, lbl) in zip(ids, samples)
            if not (img.is_file() and lbl.is_file())
        ]
        if problems:
            keep = [k for k, (img, lbl) in enumerate(samples) if img.is_file() and lbl.is_file()]
            samples, ids = [samples[k] for k in keep], [ids[k] for k in keep]
        super().__init__(
            samples,
            classes=VOC_CLASSES,
            palette=VOC_PALETTE,
            transform=transform,
            names=ids,
            seed=seed,
        )
        self.problems = problems
        self.root = base
        self.split = split
