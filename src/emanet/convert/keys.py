"""Checkpoint keys for ``emanet convert``: reading a source file, and renaming its keys onto ours.

Per source format, ``RULES`` rename source keys to our names (a prefix ending in "." renames a whole subtree)
and ``DROPS`` name the keys left out, each with the reason reported to the user. ``rename_all`` applies both to
every key and refuses a key that neither covers, guessing the right format from the key names
(``detect_format``). ``read_source`` unwraps the checkpoint containers of the reference repo, mmseg and
(Distributed)DataParallel. ``reconcile`` checks the renamed tensors against the model's state dict (every key
placed, every shape equal, nothing missing). convert.py infers and builds the model; docs/convert.md has the
per-source table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from emanet.checkpoint import CHECKPOINTS, LATEST
from emanet.convert.unpickle import PickledStub, read_checkpoint_file, read_unrestricted
from emanet.errors import ModelSourceError
from emanet.pretrained import FORMAT, WEIGHTS, is_model_folder

SOURCES = ("reference", "mmseg", "torchvision", "reference-backbone", "mmseg-backbone")
FULL_MODEL_SOURCES = ("reference", "mmseg")

# ----------------------------------------------------------------------------- key rules
# A rule is (source name, our name). A name ending in "." renames a whole subtree; otherwise one key.

_STAGES = [(f"layer{i}.", f"layer{i}.") for i in range(1, 5)]
_REFERENCE_TRUNK = [("extractor.0.", "conv1."), ("extractor.1.", "bn1.")] + [
    (f"extractor.{i + 3}.", f"layer{i}.") for i in range(1, 5)
]  # extractor = Sequential(conv1, bn1, relu, maxpool, layer1..layer4)
_REFERENCE_EMAU = [("mu", "bases"), ("conv1.", "conv_in."), ("conv2.0.", "conv_out."), ("conv2.1.", "bn_out.")]

RULES: dict[str, list[tuple[str, str]]] = {
    "reference": [(s, "backbone." + d) for s, d in _REFERENCE_TRUNK]
    + [("fc0.conv.", "head.reduce.conv."), ("fc0.bn.", "head.reduce.bn.")]
    # the module is `emau` (train.py wrote `ema` before ced8694, a typo it fixed); `ema.` is accepted too
    + [(f"{unit}.{s}", f"head.context.{d}") for unit in ("emau", "ema") for s, d in _REFERENCE_EMAU]
    + [("fc1.0.conv.", "head.fuse.conv."), ("fc1.0.bn.", "head.fuse.bn."), ("fc2.", "head.classifier.")],
    "mmseg": [("backbone.stem.", "backbone.stem.")]
    + [("backbone." + s, "backbone." + d) for s, d in _STAGES]
    + [
        ("decode_head.ema_module.bases", "head.context.bases"),
        ("decode_head.ema_in_conv.", "head.reduce."),  # ConvModule children are conv / bn, like ours
        ("decode_head.ema_mid_conv.conv.", "head.context.conv_in."),
        ("decode_head.ema_out_conv.conv.", "head.context.conv_out."),
        ("decode_head.ema_out_conv.bn.", "head.context.bn_out."),
        ("decode_head.bottleneck.", "head.fuse."),
        ("decode_head.conv_cat.", "head.cat."),
        ("decode_head.conv_seg.", "head.classifier."),
        ("auxiliary_head.convs.0.", "aux_head.conv."),
        ("auxiliary_head.conv_seg.", "aux_head.classifier."),
    ],
    "torchvision": [("conv1.", "conv1."), ("bn1.", "bn1.")] + _STAGES,
    "reference-backbone": [("conv1.", "conv1."), ("bn1.", "bn1.")] + _STAGES + _REFERENCE_TRUNK,
    "mmseg-backbone": [("stem.", "stem."), ("backbone.stem.", "stem.")]
    + _STAGES
    + [("backbone." + s, d) for s, d in _STAGES],
}

_CLASSIFIER = "ImageNet classifier: a dense backbone has none"
_NOT_BACKBONE = "segmentation head of a full checkpoint: not part of the backbone"
_NORM_BUFFERS = "input normalisation buffers, not weights (data.mean/std carry the normalisation)"
DROPS: dict[str, list[tuple[str, str]]] = {
    "reference": [],
    "mmseg": [("data_preprocessor.", _NORM_BUFFERS)],
    "torchvision": [("fc.", _CLASSIFIER)],
    "reference-backbone": [("fc.", _CLASSIFIER)]
    + [(p, _NOT_BACKBONE) for p in ("fc0.", "emau.", "ema.", "fc1.", "fc2.")],
    "mmseg-backbone": [
        ("fc.", _CLASSIFIER),
        ("head.", "classifier head of an ImageNet (mmcls/mmpretrain) model"),
        ("neck.", "ImageNet pooling neck"),
        ("data_preprocessor.", _NORM_BUFFERS),
    ]
    + [(p, _NOT_BACKBONE) for p in ("decode_head.", "auxiliary_head.")],
}

BACKBONE_FORMAT = "emanet-backbone"  # the safetensors metadata of a backbone that `emanet convert` wrote
EXPECTED_STEM = {"torchvision": "standard", "reference-backbone": "deep", "mmseg-backbone": "v1c"}


def _match(key: str, name: str) -> bool:
    return key.startswith(name) if name.endswith(".") else key == name


def rename(key: str, rules: Sequence[tuple[str, str]], *, inverse: bool = False) -> str | None:
    """Apply the first matching rule (source -> ours, or ours -> source with ``inverse``); None if none."""
    for src, dst in rules:
        a, b = (dst, src) if inverse else (src, dst)
        if _match(key, a):
            return b + key[len(a) :]
    return None


def detect_format(keys: Sequence[str]) -> str | None:
    """Guess a state dict's source format from its key names."""
    ks = set(keys)
    if "head.context.bases" in ks:
        return "emanet"  # our own names: a model that needs no conversion
    if any(k.startswith(("extractor.", "emau.", "fc0.")) for k in ks):
        return "reference"
    if any(k.startswith("decode_head.") for k in ks):
        return "mmseg"
    if "stem.0.weight" in ks or "backbone.stem.0.weight" in ks:
        return "mmseg-backbone"
    if "conv1.0.weight" in ks:
        return "reference-backbone"
    if "conv1.weight" in ks:
        return "torchvision"
    return None


# ----------------------------------------------------------------------------- reading and renaming


def _unwrap(obj: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, the other entries): {'net': ...} (reference), {'state_dict': ..., 'meta': ...} (mmseg),
    {'model': ...}, and a (Distributed)DataParallel 'module.' prefix on every key stripped."""
    extra: dict[str, Any] = {}
    for wrapper in ("state_dict", "net", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            extra = {k: v for k, v in obj.items() if k != wrapper}
            obj = obj[wrapper]
            break
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, extra


def read_source(
    src: str | os.PathLike | Mapping[str, Any], *, allow_pickle: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any], str, list[str]]:
    """A checkpoint file or dict -> (state dict, the file's other entries, a name for messages, notes on
    reading it). Unwraps the reference's, mmseg's and (Distributed)DataParallel's containers (``_unwrap``);
    pickled objects other than tensors are read as stubs, never run (unpickle.py)."""
    notes: list[str] = []
    if isinstance(src, Mapping):
        obj, name = dict(src), "<state dict>"
    else:
        name = str(src)
        _refuse_foreign(Path(src))
        obj, notes = read_checkpoint_file(Path(src), allow_pickle)
    if not isinstance(obj, Mapping):
        raise ModelSourceError(f"{name} holds a {type(obj).__name__}, not a checkpoint dict")
    if "format_version" in obj and isinstance(obj.get("model"), Mapping) and "config" in obj:
        raise ModelSourceError(
            f"{name} is already an emanet checkpoint (iteration {obj.get('iteration', '?')}): "
            "use it directly with emanet eval/predict/export, or emanet.pretrained.load_model"
        )
    state, extra = _unwrap(obj)
    stubs = sorted(
        {
            v.pickled_as
            for v in [*state.values(), *(obj.get(w) for w in ("state_dict", "net", "model"))]
            if isinstance(v, PickledStub)
        }
    )
    if stubs and not allow_pickle:
        raise ModelSourceError(
            f"{name}: its state dict holds objects of {', '.join(stubs)} (not tensors), which are read only by "
            "running the file's pickled code: if you trust the file and have the module that defines them, pass "
            "allow_pickle=True (CLI: --allow-pickle)"
        )
    if stubs:
        obj = read_unrestricted(Path(src), stubs)  # src is a file: a dict holds no stubs
        state, extra = _unwrap(obj)
        notes = ["read with allow_pickle (the file's pickled code ran)"]
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors or not state:
        raise ModelSourceError(
            f"{name}: no state dict found (top-level keys {sorted(obj)[:8]}; non-tensor entries {not_tensors[:5]})"
        )
    return state, extra, name, notes


_LOAD_DIRECTLY = "emanet predict/eval/export take it directly, and so does emanet.pretrained.load_model"


def _refuse_foreign(path: Path) -> None:
    """Refuse, before reading it, what is not a checkpoint to convert: an emanet model or run folder, an emanet
    model's own weights, and a file that is neither a PyTorch checkpoint nor a safetensors file (random bytes
    are not pickled objects: --allow-pickle would not help)."""
    if path.is_dir():
        if is_model_folder(path):
            raise ModelSourceError(f"{path} is already an emanet model folder (no conversion needed): {_LOAD_DIRECTLY}")
        if (path / LATEST).is_file() or any(path.glob(CHECKPOINTS)):
            raise ModelSourceError(f"{path} is an emanet run folder (no conversion needed): {_LOAD_DIRECTLY}")
        raise ModelSourceError(f"{path} is a folder: give the checkpoint file to convert (.pth/.pt/.safetensors)")
    if not path.is_file():
        return  # read_weights_file says it is not found
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format (PyTorch >= 1.6)
        return
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # a pickle: older torch.save
        return
    if len(head) > 8 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then its JSON header
        _refuse_emanet_safetensors(path)
        return
    what = "is empty (0 bytes)" if not head else f"starts with bytes {head[:8].hex(' ')}"
    raise ModelSourceError(
        f"{path}: not a PyTorch checkpoint (nor a safetensors file): it {what}, while a file of torch.save starts "
        "with a zip or pickle header; check that the download or copy is complete and that this is the checkpoint"
    )


def _refuse_emanet_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception:  # a damaged file: read_weights_file reports it
        return
    if fmt == FORMAT:
        where = f"its folder, {path.parent}," if path.name == WEIGHTS and is_model_folder(path.parent) else "its folder"
        raise ModelSourceError(
            f"{path} holds the weights of an emanet model folder (format {FORMAT!r}): it is already an emanet model "
            f"and needs no conversion; give {where} to emanet predict/eval/export (or emanet.pretrained.load_model)"
        )
    if fmt == BACKBONE_FORMAT:
        raise ModelSourceError(
            f"{path} is a backbone that emanet convert already wrote (format {BACKBONE_FORMAT!r}): it needs no "
            f"conversion; use it as model.pretrained_backbone={path}"
        )


def rename_all(
    state: Mapping[str, Tensor], source: str, name: str
) -> tuple[dict[str, Tensor], list[tuple[str, str]], list[tuple[str, str]]]:
    """Rename every key of ``state`` by the rules of ``source``: (tensors by our name, (source key, our key)
    pairs, (source key, reason) drops). A key no rule or drop covers is an error that suggests a format."""
    rules, drops = RULES[source], DROPS[source]
    mapped: dict[str, Tensor] = {}
    pairs, dropped, unknown = [], [], []
    for key, value in state.items():
        reason = next((why for p, why in drops if _match(key, p)), None)
        dst = None if reason else rename(key, rules)
        if reason:
            dropped.append((key, reason))
        elif dst is None:
            unknown.append(key)
        elif dst in mapped:
            raise ModelSourceError(f"{name}: {key} and another source key both map to {dst}")
        else:
            mapped[dst] = value
            pairs.append((key, dst))
    if unknown:
        guess = detect_format(list(state))
        if guess == "emanet":
            raise ModelSourceError(
                f"{name}: the keys are emanet's own (backbone.*, head.*): this is already an emanet model and "
                "needs no conversion; load it with emanet.pretrained.load_model, or save it as a model folder "
                "(emanet.pretrained.save_pretrained), which emanet predict/eval/export take directly"
            )
        if source not in FULL_MODEL_SOURCES and guess in FULL_MODEL_SOURCES:
            guess += "-backbone"  # a full model's file given to a backbone conversion: its backbone part
        hint = (
            f"; the keys look like a {guess!r} checkpoint (use --from {guess})" if guess not in (None, source) else ""
        )
        raise ModelSourceError(
            f"{name}: {len(unknown)} keys not recognised for source {source!r}: "
            f"{', '.join(unknown[:10])}{'...' if len(unknown) > 10 else ''}{hint}"
        )
    return mapped, pairs, dropped


# ----------------------------------------------------------------------------- matching the model


def reconcile(
    mapped: dict[str, Tensor],
    pairs: list[tuple[str, str]],
    target: Mapping[str, Tensor],
    source: str,
    name: str,
    dropped: list[tuple[str, str]],
    notes: list[str],
    optional: Sequence[tuple[str, str]] = (),
) -> tuple[dict[str, Tensor], list[tuple[str, str]], list[tuple[str, str]]]:
    """Check the renamed tensors against the model's state dict: every key placed, every shape equal, nothing
    missing. Returns (the state dict to load strictly, the (source, our) pairs kept, the keys filled in);
    keys the model has no place for go to ``dropped`` when ``optional`` or BN counters, else are errors."""
    state, kept, filled, unaccounted, mismatched = {}, [], [], [], []
    for src, dst in pairs:
        value = mapped[dst]
        if dst not in target:
            reason = next((why for p, why in optional if dst.startswith(p)), None)
            if reason is None and dst.endswith("num_batches_tracked"):
                reason = "BN step counter the model does not keep"
            if reason is None:
                unaccounted.append(f"{src} (-> {dst})")
            else:
                dropped.append((src, reason))
            continue
        if tuple(value.shape) != tuple(target[dst].shape):
            mismatched.append(f"{src} -> {dst}: source {tuple(value.shape)} vs model {tuple(target[dst].shape)}")
            continue
        state[dst] = value.to(target[dst].dtype) if value.dtype != target[dst].dtype else value
        kept.append((src, dst))
    missing, placed = [], {d for _, d in pairs}
    for dst, ref in target.items():
        if dst in placed:
            continue
        if dst.endswith("num_batches_tracked"):
            state[dst] = torch.zeros_like(ref)
            filled.append((dst, "BN step counter absent from the source (older PyTorch); set to 0"))
        else:
            src = rename(dst, RULES[source], inverse=True)
            missing.append(f"{dst} (source key {src})" if src else dst)
    casts = sorted({f"{mapped[d].dtype} -> {state[d].dtype}" for _, d in kept if mapped[d].dtype != state[d].dtype})
    if casts:  # exact from float16/bfloat16; float64 is rounded to the model's float32
        notes.append(f"tensors cast to the model's dtype: {', '.join(casts)}")
    problems = []
    if unaccounted:
        problems.append(f"{len(unaccounted)} source keys the model has no place for: {', '.join(unaccounted[:10])}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {'; '.join(mismatched[:10])}")
    if missing:
        problems.append(f"{len(missing)} model keys missing from the source: {', '.join(missing[:10])}")
    if problems:
        raise ModelSourceError("\n  ".join([f"{name} does not convert as a {source!r} checkpoint:", *problems]))
    return state, kept, filled
