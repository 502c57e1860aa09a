"""A generic folder layout for your own data (the same one ``write_synthetic`` produces)."""

from __future__ import annotations

from pathlib import Path

from emanet.errors import DataError

from .base import PairTransform, SegmentationDataset, _describe_names, find_images, require_dir
from .palettes import Palette, distinct_palette, read_palette_file, read_text_file

FOLDER_LAYOUT = (
    "ROOT/images/<split>/NAME.{jpg,jpeg,png}, ROOT/masks/<split>/NAME.png (same NAME; subfolders allowed), "
    "ROOT/classes.txt (one class name per line) and optionally ROOT/palette.txt ('r g b' per line)"
)


def read_classes_file(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"class list {path} not found; expected {FOLDER_LAYOUT}")
    classes = [line.strip() for line in read_text_file(path).splitlines() if line.strip()]
    if not classes:
        raise DataError(path, "the class list is empty; write one class name per line", kind="layout")
    if len(classes) > 255:
        reason = f"lists {len(classes)} classes; at most 255 fit uint8 labels with 255 = ignore"
        raise DataError(path, reason, kind="layout")
    return classes


def _images_by_name(image_dir: Path, strict: bool, problems: list[DataError]) -> dict[str, Path]:
    """The images under ``image_dir`` by sample name (relative path without suffix). Two images with one name
    raise, or with ``strict=False`` the second is recorded in ``problems`` and left out."""
    images: dict[str, Path] = {}
    for path in find_images(image_dir):
        key = path.relative_to(image_dir).with_suffix("").as_posix()
        if key in images:
            error = DataError(
                path, f"another image has the sample name {key!r}: {images[key]}; rename one", kind="duplicate"
            )
            if strict:
                raise error
            problems.append(error)
            continue
        images[key] = path
    return images


def _palette(palette_file: Path, num_classes: int) -> Palette:
    """The colours of ``palette_file`` (at least one per class), or distinct ones when there is no such file."""
    if not palette_file.is_file():
        return distinct_palette(num_classes)
    palette = read_palette_file(palette_file)
    if len(palette) < num_classes:
        raise DataError(palette_file, f"has {len(palette)} colours for {num_classes} classes", kind="layout")
    return palette


class FolderDataset(SegmentationDataset):
    """Images paired with index masks by relative path without suffix; masks are mode "P" or "L" PNGs.

    ``strict=False`` drops unpaired or duplicate files and records them in ``problems`` (``emanet
    check-data``); the default raises, listing them.
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
        classes = read_classes_file(root / "classes.txt")
        image_dir = require_dir(root / "images" / split, FOLDER_LAYOUT)
        mask_dir = require_dir(root / "masks" / split, FOLDER_LAYOUT)
        problems: list[DataError] = []
        images = _images_by_name(image_dir, strict, problems)
        masks = {p.relative_to(mask_dir).with_suffix("").as_posix(): p for p in find_images(mask_dir, (".png",))}
        if not images and not masks:
            raise DataError(
                image_dir, f"split {split!r} is empty: no images; expected {FOLDER_LAYOUT}", kind="empty_split"
            )
        no_mask = sorted(images.keys() - masks.keys())
        no_image = sorted(masks.keys() - images.keys())
        if (no_mask or no_image) and strict:
            parts = []
            if no_mask:
                parts.append(f"{len(no_mask)} image(s) in {image_dir} without a mask: {_describe_names(no_mask)}")
            if no_image:
                parts.append(f"{len(no_image)} mask(s) in {mask_dir} without an image: {_describe_names(no_image)}")
            raise DataError(root, "unpaired files; " + "; ".join(parts), kind="missing_pair")
        for key in no_mask:
            problems.append(
                DataError(images[key], f"image without a mask: {mask_dir / key}.png not found", kind="missing_pair")
            )
        for key in no_image:
            problems.append(
                DataError(
                    masks[key], f"mask without an image: no {image_dir / key}.jpg/.jpeg/.png", kind="missing_pair"
                )
            )
        images = {k: v for k, v in images.items() if k in masks}
        names = sorted(images)
        super().__init__(
            [(images[n], masks[n]) for n in names],
            classes=classes,
            palette=_palette(root / "palette.txt", len(classes)),
            transform=transform,
            names=names,
            seed=seed,
        )
        self.problems = problems
        self.root = root
        self.split = split
