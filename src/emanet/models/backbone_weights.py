"""Backbone weight files: reading .safetensors / .pth / .pt on the CPU and loading them into a ResNet key by key.

``load_backbone_weights`` unwraps training checkpoints ({'state_dict': ...}, DistributedDataParallel's
``module.`` prefix, a caller's ``prefix``), ignores an ImageNet classifier, and on any mismatch names the keys
and guesses why (wrong stem, depth or block type, a leftover prefix). ``read_weights_file`` is the one reader
of weight files, shared with the converters and model folders. ``blocks_per_stage`` reads a depth back from
``layerL.i.*`` keys. Nothing here builds a model: the architecture is in backbone.py.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from emanet.errors import ModelSourceError

# ImageNet classifier of torchvision-style files: meaningless for a dense backbone, reported as ignored.
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: left as initialised
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model: not loaded
    ignored: list[str] = field(default_factory=list)  # in the file, deliberately skipped (classifier)


# ----------------------------------------------------------------------------- reading files


def read_weights_file(path: str | os.PathLike, *, allow_pickle: bool = False, what: str = "weights") -> Any:
    """What a .safetensors / .pth / .pt file holds, read on the CPU; a damaged or foreign file is a ValueError
    naming it. ``allow_pickle`` loads with weights_only=False (runs pickled code: trusted files only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError: a damaged file
            raise ModelSourceError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # truncated file, or pickled objects weights_only refuses
        hint = ""
        if not allow_pickle and "weights_only" in str(e).lower():
            hint = (
                "; it holds pickled Python objects (e.g. an mmengine message hub): if you trust the file, "
                "pass allow_pickle=True (CLI: --allow-pickle)"
            )
        raise ModelSourceError(f"{path}: not a readable checkpoint ({type(e).__name__}){hint}") from None


def _read_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return dict(source), "<state dict>"
    sd = read_weights_file(source, what="backbone weights")
    if not isinstance(sd, Mapping):
        raise ModelSourceError(f"{source} holds a {type(sd).__name__}, not a state dict")
    return dict(sd), str(source)


def _plain_state_dict(
    source: str | os.PathLike | Mapping[str, Tensor], prefix: str | None
) -> tuple[dict[str, Tensor], str]:
    """(state dict with backbone key names, a name for messages): wrappers, ``module.`` and ``prefix`` removed."""
    sd, name = _read_state_dict(source)
    for wrapper in ("state_dict", "model"):  # training checkpoints: {'state_dict': ..., 'epoch': ...}
        if isinstance(sd.get(wrapper), Mapping):
            sd = dict(sd[wrapper])
            break
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DistributedDataParallel wrapper
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if prefix:
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise ModelSourceError(f"{name}: no key starts with prefix={prefix!r}")
    not_tensors = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ModelSourceError(
            f"{name} is not a state dict: {not_tensors[:5]} are not tensors "
            "(convert other checkpoint formats to a plain state dict first)"
        )
    return sd, name


# ----------------------------------------------------------------------------- why a file does not fit


def _detect_stem(keys: Sequence[str]) -> tuple[str, str] | None:
    for stem, key in (("deep", "conv1.0.weight"), ("v1c", "stem.0.weight"), ("standard", "conv1.weight")):
        if key in keys:
            return stem, key
    return None


def blocks_per_stage(keys: Iterable[str], prefix: str = "") -> tuple[int, ...]:
    """Blocks in layer1..layer4 read from ``{prefix}layerL.i.*`` state-dict keys (0 for an absent stage)."""
    counts = [0, 0, 0, 0]
    for key in keys:
        parts = key[len(prefix) :].split(".") if key.startswith(prefix) else []
        if len(parts) > 2 and parts[0] in ("layer1", "layer2", "layer3", "layer4") and parts[1].isdigit():
            stage = int(parts[0][-1]) - 1
            counts[stage] = max(counts[stage], int(parts[1]) + 1)
    return tuple(counts)


def _hints(model: nn.Module, keys: Sequence[str], model_keys: Sequence[str]) -> list[str]:
    """Guess why the file does not fit the model: wrong stem, depth or block type, a leftover key prefix."""
    hints = []
    found, model_stem = _detect_stem(keys), getattr(model, "stem_type", None)
    if found is not None and model_stem is not None and found[0] != model_stem:
        hints.append(
            f"the file looks like a {found[0]!r} stem checkpoint ({found[1]}) but the model has "
            f"stem={model_stem!r}: build it with stem={found[0]!r}"
        )
    file_layers, model_layers = blocks_per_stage(keys), getattr(model, "layers", None)
    if any(file_layers) and model_layers is not None and file_layers != model_layers:
        hints.append(f"the file has {file_layers} blocks per stage, the model {model_layers}: wrong depth")
    file_bottleneck = any(k.startswith("layer1.0.conv3.") for k in keys)
    model_bottleneck = any(k.startswith("layer1.0.conv3.") for k in model_keys)
    if any(file_layers) and file_bottleneck != model_bottleneck:
        kinds = ("BasicBlock", "Bottleneck")
        hints.append(
            f"the file has {kinds[file_bottleneck]} blocks, the model {kinds[model_bottleneck]} "
            "(resnet18/34 use BasicBlock, resnet50/101/152 Bottleneck)"
        )
    wrapped = [k[: k.index("layer1.0.")] for k in keys if "layer1.0." in k and not k.startswith("layer1.")]
    if wrapped:
        hints.append(f"keys start with {wrapped[0]!r}: pass prefix={wrapped[0]!r}")
    return hints


# ----------------------------------------------------------------------------- loading


def load_backbone_weights(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
    *,
    strict: bool = True,
    prefix: str | None = None,
) -> LoadReport:
    """Copy a backbone checkpoint (.pth/.pt/.safetensors or a dict) into ``model``, checking every key."""
    sd, name = _plain_state_dict(path_or_state_dict, prefix)
    target = model.state_dict()
    report = LoadReport()
    report.ignored = [k for k in CLASSIFIER_KEYS if k in sd and k not in target]
    report.unexpected = [k for k in sd if k not in target and k not in report.ignored]
    # Old checkpoints predate BN's num_batches_tracked counter; it carries no learned information.
    report.missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in target.items()
        if k in sd and sd[k].shape != v.shape
    ]

    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched))
    if report.missing:
        problems.append(f"{len(report.missing)} missing keys: {', '.join(report.missing)}")
    if report.unexpected:
        problems.append(f"{len(report.unexpected)} unexpected keys: {', '.join(report.unexpected)}")
    if problems:
        msg = "\n  ".join(
            [f"backbone weights {name} do not fit the model:"] + _hints(model, list(sd), list(target)) + problems
        )
        if mismatched or strict:
            fix = "" if mismatched else "\n  (pass strict=False to load the matching keys anyway)"
            raise ModelSourceError(msg + fix)
        warnings.warn(msg, stacklevel=2)

    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    return report
