"""Checkpoint import from the EMANet reference repo, mmsegmentation and ImageNet backbone files.

Every source key is either mapped (renamed; values untouched apart from a lossless cast to float32) or
dropped with a reason. Anything else is an error: an unrecognised key, a shape mismatch (naming both keys
and both shapes), or a model key that no source key fills. The one exception is BN's ``num_batches_tracked``
counter, which older files lack: it is set to 0 and listed in ``filled``.

Full models get a config inferred from the tensor shapes (depth, widths, classes, K, auxiliary head) plus
the settings the source architecture needs so that our model computes what it computed there (stem,
dilations, align_corners, BN momentum, the bases' moving average, input normalisation). docs/convert.md
has the per-source table, the key-mapping rules and the known numerical differences.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from emanet.config import Config, load_config
from emanet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from emanet.mmseg_config import parse_mmseg_meta
from emanet.models.backbone import BACKBONES, blocks_per_stage, read_weights_file, resnet_for_blocks
from emanet.models.emanet import ModelConfig, build_model

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


# ----------------------------------------------------------------------------- reading


def read_source(
    src: str | os.PathLike | Mapping[str, Any], *, allow_pickle: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """A checkpoint file or dict -> (state dict, the file's other entries, a name for messages).

    Unwraps {'net': ...} (reference), {'state_dict': ..., 'meta': ...} (mmseg) and {'model': ...}, and strips a
    'module.' prefix that (Distributed)DataParallel leaves on every key.
    """
    if isinstance(src, Mapping):
        obj, name = dict(src), "<state dict>"
    else:
        name = str(src)
        obj = read_weights_file(src, allow_pickle=allow_pickle, what="checkpoint to convert")
    if not isinstance(obj, Mapping):
        raise ValueError(f"{name} holds a {type(obj).__name__}, not a checkpoint dict")
    if "format_version" in obj and isinstance(obj.get("model"), Mapping) and "config" in obj:
        raise ValueError(
            f"{name} is already an emanet checkpoint (iteration {obj.get('iteration', '?')}): "
            "use it directly with emanet eval/predict/export, or emanet.load_model"
        )
    extra: dict[str, Any] = {}
    for wrapper in ("state_dict", "net", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            extra = {k: v for k, v in obj.items() if k != wrapper}
            obj = dict(obj[wrapper])
            break
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors or not state:
        raise ValueError(
            f"{name}: no state dict found (top-level keys {sorted(obj)[:8]}; non-tensor entries {not_tensors[:5]})"
        )
    return state, extra, name


# ----------------------------------------------------------------------------- inference from shapes


def infer_backbone(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Any]:
    """{'backbone': 'resnet101', 'backbone_width': 64} from the layerN.i.* keys (our names) and shapes."""
    counts = blocks_per_stage(state, prefix)
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    name = resnet_for_blocks(bottleneck, counts)
    if name is None:
        kind = "Bottleneck" if bottleneck else "BasicBlock"
        raise ValueError(
            f"blocks per stage {tuple(counts)} ({kind}) match no supported ResNet "
            "(resnet18/34: BasicBlock 2-2-2-2 / 3-4-6-3; resnet50/101/152: Bottleneck "
            "3-4-6-3 / 3-4-23-3 / 3-8-36-3)"
        )
    width_key = f"{prefix}layer1.0.conv1.weight"
    if width_key not in state:
        raise ValueError(f"no {width_key} in the (renamed) source: cannot read the backbone width")
    return {"backbone": name, "backbone_width": int(state[width_key].shape[0])}


def _need(mapped: Mapping[str, Tensor], key: str, source: str, what: str) -> Tensor:
    if key not in mapped:
        src = rename(key, RULES[source], inverse=True)
        raise ValueError(f"source key {src} is missing: it is needed to infer {what}")
    return mapped[key]


def infer_model(mapped: Mapping[str, Tensor], source: str) -> dict[str, Any]:
    """ModelConfig fields readable from the (renamed) tensors."""
    bases = _need(mapped, "head.context.bases", source, "the number of bases K")
    fields: dict[str, Any] = {
        **infer_backbone(mapped, "backbone."),
        "arch": "emanet",
        "channels": int(_need(mapped, "head.reduce.conv.weight", source, "the EMA width").shape[0]),
        "mid_channels": int(_need(mapped, "head.fuse.conv.weight", source, "the width after the unit").shape[0]),
        "num_classes": int(_need(mapped, "head.classifier.weight", source, "the class count").shape[0]),
        "num_bases": int(bases.shape[-1]),
        # mmseg with concat_input=False has no conv_cat: that is exactly our "reference" head
        "head_layout": "mmseg" if any(k.startswith("head.cat.") for k in mapped) else "reference",
        "aux": any(k.startswith("aux_head.") for k in mapped),
    }
    if fields["aux"]:
        fields["aux_channels"] = int(_need(mapped, "aux_head.conv.conv.weight", source, "the aux width").shape[0])
    return fields


# ----------------------------------------------------------------------------- per-source settings

# What each source architecture computes, beyond what the shapes say (docs/convert.md explains each).
MODEL_SETTINGS: dict[str, dict[str, Any]] = {
    "reference": dict(
        stem="deep",
        output_stride=8,
        multi_grid=True,
        align_corners=True,
        bn_momentum=3e-4,
        num_stages=3,
        eval_stages=None,
        bases_update="ema",
        momentum=0.1,
        renormalize=False,
        differentiable=False,
        residual="conv",
        dropout=0.1,
    ),
    "mmseg": dict(
        stem="v1c",
        output_stride=8,
        multi_grid=False,
        align_corners=False,
        bn_momentum=0.1,
        num_stages=3,
        eval_stages=None,
        bases_update="ema",
        momentum=0.1,
        renormalize=True,
        differentiable=False,
        residual="conv",
        dropout=0.1,
    ),
}
DATA_SETTINGS: dict[str, dict[str, Any]] = {
    # The reference's dataset.py computes (RGB/255 - MEAN) / STD since f2afd7f (2019-08-24; the released
    # final.pth was re-uploaded for it); its first release divided by MEAN: a model trained with that code
    # converts with the override data.std=[0.485,0.456,0.406] (docs/convert.md).
    # Eval pads to H, W = 1 mod settings.STRIDE (the output stride: 8 here, set from the model below).
    "reference": dict(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), eval_pad_multiple=8, eval_pad_offset=1),
    # mmseg: mean 123.675/116.28/103.53, std 58.395/57.12/57.375 on RGB 0-255 = the ImageNet values on 0-1
    "mmseg": dict(
        mean=[123.675 / 255, 116.28 / 255, 103.53 / 255],
        std=[58.395 / 255, 57.12 / 255, 57.375 / 255],
        eval_pad_multiple=0,
        eval_pad_offset=0,
    ),
}
DATASETS_BY_CLASSES = {21: "voc", 19: "cityscapes", 150: "ade20k"}


# ----------------------------------------------------------------------------- conversion


@dataclass
class ConversionResult:
    source: str
    state_dict: dict[str, Tensor]  # our key names; loads strictly into the model (or backbone)
    mapped: list[tuple[str, str]]  # (source key, our key)
    dropped: list[tuple[str, str]]  # (source key, reason)
    filled: list[tuple[str, str]] = field(default_factory=list)  # (our key, reason): not in the source
    model_config: ModelConfig | None = None  # full models
    config: Config | None = None  # full models: what the model folder's config.json holds
    backbone: dict[str, Any] | None = None  # backbone sources: backbone, stem, backbone_width
    class_names: list[str] | None = None
    palette: list[tuple[int, int, int]] | None = None
    notes: list[str] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)  # the converted model or backbone, eval mode

    def summary(self) -> str:
        lines = []
        if self.model_config is not None:
            m = self.model_config
            lines.append(
                f"model: {m.arch} {m.backbone} (width {m.backbone_width}) stem={m.stem} OS{m.output_stride} "
                f"head={m.head_layout} channels={m.channels} K={m.num_bases} classes={m.num_classes} "
                f"aux={m.aux}"
            )
        if self.backbone is not None:
            b = self.backbone
            lines.append(
                f"backbone: {b['backbone']} stem={b['stem']} width={b['backbone_width']} (use with "
                f"model.backbone={b['backbone']} model.stem={b['stem']} model.pretrained_backbone=PATH)"
            )
        if self.config is not None:
            d = self.config.data
            lines.append(
                f"input: (RGB/255 - mean) / std with mean {[round(v, 4) for v in d.mean]}, "
                f"std {[round(v, 4) for v in d.std]} (saved as data.mean/std)"
            )
        lines.append(f"mapped {len(self.mapped)} keys, dropped {len(self.dropped)}, filled {len(self.filled)}")
        for verb, entries in (("dropped", self.dropped), ("filled", self.filled)):
            by_reason: dict[str, list[str]] = {}
            for key, why in entries:
                by_reason.setdefault(why, []).append(key)
            for why, keys in by_reason.items():
                more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
                lines.append(f"  {verb} {len(keys)} ({why}): {', '.join(keys[:6])}{more}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _bgr_to_rgb(mapped: dict[str, Tensor], key: str) -> None:
    # a BGR-trained first conv fed RGB: permute its input channels and the result is unchanged
    mapped[key] = mapped[key].flip(1)


def _reconcile(
    mapped: dict[str, Tensor],
    pairs: list[tuple[str, str]],
    target: Mapping[str, Tensor],
    source: str,
    name: str,
    dropped: list[tuple[str, str]],
    notes: list[str],
    optional: Sequence[tuple[str, str]] = (),
) -> tuple[dict[str, Tensor], list[tuple[str, str]], list[tuple[str, str]]]:
    """Check the renamed tensors against the model: every key placed, every shape equal, nothing missing."""
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
        raise ValueError("\n  ".join([f"{name} does not convert as a {source!r} checkpoint:", *problems]))
    return state, kept, filled


def _rename_all(state: Mapping[str, Tensor], source: str, name: str):
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
            raise ValueError(f"{name}: {key} and another source key both map to {dst}")
        else:
            mapped[dst] = value
            pairs.append((key, dst))
    if unknown:
        guess = detect_format(list(state))
        if source not in FULL_MODEL_SOURCES and guess in FULL_MODEL_SOURCES:
            guess += "-backbone"  # a full model's file given to a backbone conversion: its backbone part
        hint = (
            f"; the keys look like a {guess!r} checkpoint (use --from {guess})" if guess not in (None, source) else ""
        )
        raise ValueError(
            f"{name}: {len(unknown)} keys not recognised for source {source!r}: "
            f"{', '.join(unknown[:10])}{'...' if len(unknown) > 10 else ''}{hint}"
        )
    return mapped, pairs, dropped


def convert_checkpoint(
    src: str | os.PathLike | Mapping[str, Any],
    source: str = "reference",
    *,
    overrides: Sequence[str] = (),
    allow_pickle: bool = False,
) -> ConversionResult:
    """Convert a checkpoint (file or dict) from ``source`` into our key layout, checking every key.

    ``overrides`` (``section.key=value``, full models only) go on top of the inferred config, e.g.
    ``model.output_stride=16`` for a reference model trained at OS16 (dilations are not in the weights).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    state, extra, name = read_source(src, allow_pickle=allow_pickle)
    mapped, pairs, dropped = _rename_all(state, source, name)
    notes = []
    if isinstance(extra.get("step"), int):
        notes.append(f"the source checkpoint was saved at step {extra['step']}")

    if source not in FULL_MODEL_SOURCES:
        if overrides:
            raise ValueError("overrides apply to full-model conversions (reference, mmseg) only")
        stem = EXPECTED_STEM[source]
        found = detect_format(list(mapped))
        if found is not None and EXPECTED_STEM.get(found, stem) != stem:
            raise ValueError(f"{name}: the stem keys are those of a {EXPECTED_STEM[found]!r} stem: use --from {found}")
        arch = {**infer_backbone(mapped), "stem": stem}
        backbone = BACKBONES[arch["backbone"]](stem=stem, width=arch["backbone_width"])
        sd, kept, filled = _reconcile(mapped, pairs, backbone.state_dict(), source, name, dropped, notes)
        backbone.load_state_dict(sd, strict=True)
        return ConversionResult(source, sd, kept, dropped, filled, backbone=arch, notes=notes, model=backbone.eval())

    cfg = Config()
    model_fields = {**MODEL_SETTINGS[source], **infer_model(mapped, source)}
    data_fields = dict(DATA_SETTINGS[source])
    eval_fields: dict[str, Any] = {}
    class_names = palette = None
    if source == "mmseg":
        meta = parse_mmseg_meta(extra.get("meta") or {})
        model_fields.update(meta["model"])
        data_fields.update(meta["data"])
        eval_fields.update(meta["eval"])
        notes += meta["notes"]
        class_names, palette = meta.get("class_names"), meta.get("palette")
        if meta.get("bgr"):
            _bgr_to_rgb(mapped, "backbone.stem.0.weight")
            data_fields["mean"], data_fields["std"] = data_fields["mean"][::-1], data_fields["std"][::-1]
            notes.append("BGR model: the first conv's input channels and mean/std were reordered to RGB")
    cfg.data.dataset = DATASETS_BY_CLASSES.get(model_fields["num_classes"], cfg.data.dataset)
    base = cfg.to_dict()
    base["model"].update(model_fields, pretrained_backbone=None)
    base["data"].update(data_fields)
    base["eval"].update(eval_fields)
    cfg = load_config(None, overrides, base=base)
    m = cfg.model
    if source == "reference" and not any(o.split("=", 1)[0].strip() == "data.eval_pad_multiple" for o in overrides):
        cfg.data.eval_pad_multiple = m.output_stride  # pad_inf pads to 1 mod settings.STRIDE
    if source == "mmseg" and m.backbone in ("resnet18", "resnet34") and m.output_stride != 32:
        raise ValueError(
            f"{name}: mmseg's ResNet-18/34 BasicBlock dilates only its first 3x3 conv, ours both: a "
            f"dilated (OS{m.output_stride}) {m.backbone} cannot be reproduced exactly "
            "(only model.output_stride=32 converts)"
        )
    if class_names is not None and len(class_names) != m.num_classes:
        notes.append(f"ignored {len(class_names)} class names from the checkpoint for {m.num_classes} classes")
        class_names = palette = None
    if palette is not None and len(palette) != m.num_classes:
        palette = None
    model = build_model(m)
    sd, kept, filled = _reconcile(
        mapped,
        pairs,
        model.state_dict(),
        source,
        name,
        dropped,
        notes,
        optional=[("aux_head.", "auxiliary head left out (model.aux=false)")],
    )
    model.load_state_dict(sd, strict=True)
    return ConversionResult(
        source,
        sd,
        kept,
        dropped,
        filled,
        model_config=m,
        config=cfg,
        class_names=class_names,
        palette=palette,
        notes=notes,
        model=model.eval(),
    )


def convert(
    src: str | os.PathLike | Mapping[str, Any],
    dst: str | os.PathLike,
    source: str = "reference",
    *,
    overrides: Sequence[str] = (),
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert and write: a model folder (full models, via save_pretrained) or a backbone .safetensors file."""
    from emanet.pretrained import save_pretrained

    dst = Path(dst)
    full = source in FULL_MODEL_SOURCES
    if full and dst.is_file():
        raise ValueError(f"{dst} is a file: a full-model conversion writes a model folder")
    if not full and dst.suffix != ".safetensors":
        raise ValueError(f"{dst}: a backbone conversion writes one .safetensors file; name it *.safetensors")
    if dst.exists() and not overwrite and (dst.is_file() or any(dst.iterdir())):
        raise ValueError(f"{dst} already exists; choose a new path or pass overwrite=True (CLI: --overwrite)")
    result = convert_checkpoint(src, source, overrides=overrides, allow_pickle=allow_pickle)
    if full:
        assert result.config is not None and result.model is not None
        save_pretrained(result.model, result.config, dst, class_names=result.class_names, palette=result.palette)
    else:
        from safetensors.torch import save_file

        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.clone().contiguous() for k, v in result.state_dict.items()},
            str(dst),
            metadata={
                "format": "emanet-backbone",
                "converted_from": source,
                **{k: str(v) for k, v in (result.backbone or {}).items()},
            },
        )
    return result
