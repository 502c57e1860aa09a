"""Dataset readers and paired transforms. Knows no models and no devices.

Look datasets up by name with ``DATASETS`` / ``build_dataset``; every dataset returns ``(image, mask)``
(after its transform: float (3, H, W) and int64 (H, W)) and offers ``read(i)`` for the raw pair.
"""

from __future__ import annotations

from emanet.errors import DataError

from .ade import ADE20KDataset
from .base import KINDS, SegmentationDataset, SkipBadSamples, read_image, read_label, worker_init_fn
from .check import Problem, Report, check_data_config, check_dataset, check_split, colour_mask_to_index
from .cityscapes import CityscapesDataset, cityscapes_label_lut
from .datasets import DATASETS, build_dataset
from .folder import FolderDataset
from .palettes import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    VOC_CLASSES,
    VOC_PALETTE,
    distinct_palette,
    index_image,
    voc_palette,
)
from .synthetic import SceneConfig, SyntheticContextDataset, write_synthetic
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REFERENCE_SCALES,
    ColorJitter,
    Compose,
    PadToMultiple,
    PadToSize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
    ToTensorNormalize,
    eval_transform,
    train_transform,
)
from .voc import VOCDataset

__all__ = [
    "ADE20KDataset",
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "CityscapesDataset",
    "ColorJitter",
    "Compose",
    "DATASETS",
    "DataError",
    "FolderDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KINDS",
    "PadToMultiple",
    "PadToSize",
    "Problem",
    "REFERENCE_SCALES",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomScale",
    "Report",
    "Resize",
    "SceneConfig",
    "SegmentationDataset",
    "SkipBadSamples",
    "SyntheticContextDataset",
    "ToTensorNormalize",
    "VOCDataset",
    "VOC_CLASSES",
    "VOC_PALETTE",
    "build_dataset",
    "check_data_config",
    "check_dataset",
    "check_split",
    "colour_mask_to_index",
    "cityscapes_label_lut",
    "distinct_palette",
    "eval_transform",
    "index_image",
    "read_image",
    "read_label",
    "train_transform",
    "voc_palette",
    "worker_init_fn",
    "write_synthetic",
]
