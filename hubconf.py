"""torch.hub entry points: ``torch.hub.load("path/to/emanet", "emanet_resnet50", source="local", num_classes=21)``.

The builders are the package's own (keyword-only ModelConfig fields); ``from_pretrained`` loads a model
folder written by ``save_pretrained`` (or, with ``pip install emanet[hub]``, a Hugging Face Hub repo id).
"""

import sys
from pathlib import Path

dependencies = ["torch", "numpy", "PIL", "yaml", "safetensors", "tqdm"]

_SRC = str(Path(__file__).resolve().parent / "src")
if _SRC not in sys.path:  # a checkout used without `pip install`
    sys.path.insert(0, _SRC)

from emanet.deploy.hub import from_pretrained  # noqa: E402
from emanet.models.emanet import (  # noqa: E402
    emanet_resnet50,
    emanet_resnet101,
    emanet_resnet152,
    fcn_resnet50,
    fcn_resnet101,
    nonlocal_resnet50,
    nonlocal_resnet101,
)

__all__ = [
    "emanet_resnet50",
    "emanet_resnet101",
    "emanet_resnet152",
    "fcn_resnet50",
    "fcn_resnet101",
    "from_pretrained",
    "nonlocal_resnet50",
    "nonlocal_resnet101",
]
