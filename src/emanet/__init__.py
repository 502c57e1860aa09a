"""emanet: Expectation-Maximization Attention Networks for semantic segmentation."""

from importlib import metadata as _metadata

from emanet.models.em import EMAUnit, em_attention
from emanet.models.emanet import MODELS as _BUILDERS

# The builders are named here for type checkers and IDEs; __all__ takes them from their one table, MODELS
from emanet.models.emanet import (  # noqa: F401
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
__all__ = ["EMAUnit", "ModelConfig", "SegmentationModel", "build_model", "em_attention"]
__all__ += list(_BUILDERS)  # every builder, by their one table (models.emanet.MODELS)
