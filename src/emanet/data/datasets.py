"""The datasets by name: ``DATASETS`` and ``build_dataset``, which the package, ``check_split`` and the run
configuration's validation look names up in."""

from __future__ import annotations

from pathlib import Path

from emanet.errors import ConfigError

from .ade import ADE20KDataset
from .base import SegmentationDataset
from .cityscapes import CityscapesDataset
from .folder import FolderDataset
from .synthetic import SyntheticContextDataset
from .voc import VOCDataset

DATASETS = {
    "voc": VOCDataset,
    "cityscapes": CityscapesDataset,
    "ade20k": ADE20KDataset,
    "folder": FolderDataset,
    "synthetic": SyntheticContextDataset,
}


def build_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    split: str,
    transform=None,
    **kwargs,
) -> SegmentationDataset:
    """``DATASETS[name](root, split, transform=..., **kwargs)``; "synthetic" takes no root.

    The folder datasets take ``strict=False`` to drop unpaired files into ``dataset.problems`` instead of
    raising (``check_dataset`` does that).
    """
    if name not in DATASETS:
        raise ConfigError(f"data.dataset: unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    cls = DATASETS[name]
    if name == "synthetic":
        if root is not None:
            raise ConfigError("data.root: the synthetic dataset is generated on the fly and takes no root")
        return cls(split, transform=transform, **kwargs)
    if root is None:
        raise ConfigError(
            f"data.root: dataset {name!r} needs a root folder (data.root=/path/to/it, or a --config that sets it)"
        )
    return cls(root, split, transform=transform, **kwargs)
