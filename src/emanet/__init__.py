"""emanet: Expectation-Maximization Attention Networks for semantic segmentation."""

from importlib import metadata as _metadata

from emanet.deploy.hub import from_pretrained, push_model
from emanet.deploy.predict import Predictor
from emanet.models.em import EMAUnit, em_attention
from emanet.models.emanet import MODELS as _BUILDERS

# The builders are named here for type checkers and IDEs; __all__ takes them from their one table, MODELS
from emanet.models.emanet import (  # noqa: F401
    ModelConfig,
    PretrainedIO,
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
from emanet.pretrained import save_pretrained

# model.save_pretrained / SegmentationModel.from_pretrained / model.push_to_hub call these: models/ may not
# import the model-folder format or the Hub (models/emanet.py, "saving and loading", says why it is done here)
SegmentationModel.pretrained_io = PretrainedIO(save=save_pretrained, load=from_pretrained, push=push_model)

try:  # pyproject.toml is the one source of the version; an installed package carries it in its metadata
    __version__ = _metadata.version("emanet")
except _metadata.PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
__all__ = [
    "EMAUnit",
    "ModelConfig",
    "Predictor",
    "SegmentationModel",
    "build_model",
    "em_attention",
    "from_pretrained",
    "save_pretrained",
]
__all__ += list(_BUILDERS)  # every builder, by their one table (models.emanet.MODELS)
