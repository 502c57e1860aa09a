"""emanet: Expectation-Maximization Attention Networks for semantic segmentation."""

from emanet.em import EMAUnit, em_attention
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

__version__ = "0.1.0"
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
