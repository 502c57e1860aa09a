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
from emanet.models.emanet import MODELS  # noqa: E402

# The builders torch.hub lists and loads by name are the package's one table of them
globals().update(MODELS)
__all__ = ["from_pretrained"]
__all__ += list(MODELS)
