"""Reading a pickled checkpoint without running its code: ``torch.load`` with a restricted unpickler that
rebuilds tensors, dicts and a few torch types and turns every other pickled object (mmengine's message hub,
numpy arrays, argparse namespaces) into an inert ``PickledStub``, never importing the module it names. An
mmengine Runner checkpoint thus converts without mmengine. Used by keys.read_source.
"""

from __future__ import annotations

import codecs
import collections
import pickle
import types
from pathlib import Path
from typing import Any

import torch

from emanet.errors import ModelSourceError
from emanet.models.backbone_weights import read_weights_file

__all__ = ["PickledStub", "read_checkpoint_file", "read_unrestricted"]


class PickledStub:
    """An object of a class the restricted reader does not rebuild (an mmengine MessageHub, a numpy array, an
    argparse Namespace, ...): it keeps the arguments and state it was pickled with and runs none of its code."""

    pickled_as = "?"  # "module.Class", set on each stub class

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledStub:
        obj = super().__new__(cls)
        obj.__dict__["pickled_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["pickled_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # a dict subclass's items
        self.__dict__.setdefault("pickled_items", {})[key] = value

    def append(self, value: Any) -> None:  # a list subclass's items
        self.__dict__.setdefault("pickled_items", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("pickled_items", []).extend(values)

    def __repr__(self) -> str:
        return f"<{self.pickled_as}, not rebuilt>"


# What the restricted reader rebuilds: the containers and tensor rebuilders of a torch.save file (the globals
# torch.load(weights_only=True) allows for them) and torch dtypes; every other global becomes a PickledStub.
_REBUILT = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): codecs.encode,  # bytes in a protocol-2 pickle
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle's documented way to restrict globals (``find_class``): known torch rebuilders or a stub class,
    never an import of the named module, so no pickled code runs and no module need be installed."""

    stubbed: set[str]  # "module.Class" of every stub class made, for the notes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REBUILT:
            return _REBUILT[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        qualified = f"{module}.{name}"
        self.stubbed.add(qualified)
        return _STUBS.setdefault(qualified, type(name, (PickledStub,), {"pickled_as": qualified}))


_STUBS: dict[str, type] = {}


def _restricted_pickle_module(stubbed: set[str]) -> types.ModuleType:
    """A ``pickle_module`` for torch.load whose Unpickler is the restricted one (torch subclasses it)."""

    class Unpickler(_RestrictedUnpickler):
        pass

    Unpickler.stubbed = stubbed
    module = types.ModuleType("emanet_restricted_pickle")
    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = lambda f, **kwargs: Unpickler(f, **kwargs).load()  # type: ignore[attr-defined]
    return module


def read_checkpoint_file(path: Path, allow_pickle: bool) -> tuple[Any, list[str]]:
    """What a checkpoint file holds and the notes on reading it. torch.load(weights_only=True) first; a file
    with other pickled objects (mmengine's message hub, numpy arrays, argparse namespaces) is read by the
    restricted unpickler, those objects left as PickledStub (the tensors and the config text are what a
    conversion needs). ``allow_pickle`` is only for a state dict that itself holds such objects."""
    if path.suffix == ".safetensors" or not path.is_file():
        return read_weights_file(path, what="checkpoint to convert"), []
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError:  # pickled objects weights_only refuses: read them as stubs below
        pass
    except Exception as e:  # a truncated or damaged file
        raise ModelSourceError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    stubbed: set[str] = set()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module(stubbed))
    except Exception as e:
        raise ModelSourceError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    note = (
        f"read without running pickled code: {len(stubbed)} kind(s) of Python object outside the state dict were "
        f"not rebuilt (not needed): {', '.join(sorted(stubbed)[:8])}{' ...' if len(stubbed) > 8 else ''}"
    )
    return obj, [note] if stubbed else []


def read_unrestricted(path: Path, classes: list[str]) -> Any:
    """torch.load(weights_only=False): runs the file's pickled code (allow_pickle, trusted files only); a
    module it needs and that is missing is named."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise ModelSourceError(
            f"{path}: its state dict holds objects of {', '.join(classes)}, and rebuilding them needs the Python "
            f"module {e.name!r}, which is not installed: install the package that provides it"
        ) from None
    except Exception as e:
        raise ModelSourceError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
