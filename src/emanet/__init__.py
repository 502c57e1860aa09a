"""emanet: Expectation-Maximization Attention Networks for semantic segmentation."""

from importlib import metadata as _metadata

from emanet.models.em import EMAUnit, em_attention
from emanet.models.emanet import (
    ModelConfig,
    SegmentationModel,
    build_model,
    emanet_resnet50,
    emanet_resnet101,
    emanet_resnet152,
    fcn_resnet50,
    fcn_resnet101,
    nonlocal_resnet50,
    nonlocal_resnet101,
)

try:  # pyproject.toml is the one source of the version; an installed package carries it in its metadata
    __version__ = _metadata.version("emanet")
except _metadata.PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
__all__ = [
    "EMAUnit",
    "ModelConfig",
    "SegmentationModel",
    "build_model",
    "em_attention",
    "emanet_resnet50",
    "emanet_resnet101",
    "emanet_resnet152",
    "fcn_resnet50",
    "fcn_resnet101",
    "nonlocal_resnet50",
    "nonlocal_resnet101",
]
