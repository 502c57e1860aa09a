"""torch.hub entry points: ``torch.hub.load("path/to/emanet", "emanet_resnet50", source="local", num_classes=21)``.

The builders are the package's own (keyword-only ModelConfig fields; a misspelled one gets the closest name).
``weights=`` loads a saved model instead: a model folder written by ``save_pretrained``, a checkpoint file, a run
folder or a Hugging Face Hub repo ``hf://user/name`` (the hub extra); the keywords then apply on top of its config.
emanet publishes no weights of its own, so ``pretrained=True`` is an error that says what to pass.
``from_pretrained(source)`` loads any of those sources whatever its architecture.
"""

import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch", "numpy", "PIL", "yaml", "safetensors", "tqdm"]

_SRC = str(_Path(__file__).resolve().parent / "src")
if _SRC not in _sys.path:  # a checkout used without `pip install`
    _sys.path.insert(0, _SRC)

from emanet.deploy.hub import entry_points as _entry_points  # noqa: E402

# The builders torch.hub lists and loads by name: the package's one table of them (models.emanet.MODELS).
# Every other name here is private (a leading _), so that torch.hub.list shows the entry points only.
_POINTS = _entry_points()
globals().update(_POINTS)
__all__ = list(_POINTS)
