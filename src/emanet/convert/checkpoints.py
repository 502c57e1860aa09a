"""Checkpoint import from the EMANet reference repo, mmsegmentation and ImageNet backbone files.

Every source key is either mapped (renamed; values untouched apart from a lossless cast to float32) or
dropped with a reason. Anything else is an error: an unrecognised key, a shape mismatch (naming both keys
and both shapes), or a model key that no source key fills. The one exception is BN's ``num_batches_tracked``
counter, which older files lack: it is set to 0 and listed in ``filled``.

Full models get a config inferred from the tensor shapes (depth, widths, classes, K, auxiliary head) plus
the settings the source architecture needs so that our model computes what it computed there (stem,
dilations, align_corners, BN momentum, the bases' moving average, input normalisation).

This module infers the model from the renamed tensors, builds it and writes the result (``convert``);
keys.py holds the per-source key rules, the reading of the source file (unpickle.py: pickled objects as inert
stubs) and the key-by-key check against the model; mmseg_config.py reads an mmseg checkpoint's config text;
origin.py records where the model came from and what the file did not say (config.json's "origin").
docs/convert.md has the per-source table, the key-mapping rules and the known numerical differences.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from emanet.checkpoint import atomic_path
from emanet.config import Config, load_config
from emanet.convert.keys import (
    BACKBONE_FORMAT,
    EXPECTED_STEM,
    FULL_MODEL_SOURCES,
    RULES,
    SOURCES,
    detect_format,
    read_source,
    reconcile,
    rename,
    rename_all,
)
from emanet.convert.mmseg_config import parse_mmseg_meta
from emanet.convert.origin import DATASETS_BY_CLASSES, conversion_origin
from emanet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from emanet.errors import ConfigError, ModelSourceError
from emanet.models.backbone import BACKBONES, resnet_for_blocks
from emanet.models.backbone_weights import blocks_per_stage
from emanet.models.emanet import ModelConfig, build_model
from emanet.pretrained import save_pretrained

# ----------------------------------------------------------------------------- inference from shapes


def infer_backbone(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Any]:
    """{'backbone': 'resnet101', 'backbone_width': 64} from the layerN.i.* keys (our names) and shapes."""
    counts = blocks_per_stage(state, prefix)
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    name = resnet_for_blocks(bottleneck, counts)
    if name is None:
        kind = "Bottleneck" if bottleneck else "BasicBlock"
        raise ModelSourceError(
            f"blocks per stage {tuple(counts)} ({kind}) match no supported ResNet "
            "(resnet18/34: BasicBlock 2-2-2-2 / 3-4-6-3; resnet50/101/152: Bottleneck "
            "3-4-6-3 / 3-4-23-3 / 3-8-36-3)"
        )
    width_key = f"{prefix}layer1.0.conv1.weight"
    if width_key not in state:
        raise ModelSourceError(f"no {width_key} in the (renamed) source: cannot read the backbone width")
    return {"backbone": name, "backbone_width": int(state[width_key].shape[0])}


def _need(mapped: Mapping[str, Tensor], key: str, source: str, what: str) -> Tensor:
    if key not in mapped:
        src = rename(key, RULES[source], inverse=True)
        raise ModelSourceError(f"source key {src} is missing: it is needed to infer {what}")
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

# ----------------------------------------------------------------------------- conversion


@dataclass
class ConversionResult:
    """A converted checkpoint: our state dict, what each source key became, and the config it implies."""

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
    origin: dict[str, Any] | None = None  # full models: where it came from, config.json's "origin" (model card)

    def summary(self) -> str:
        """The conversion in words: the model or backbone, the input normalisation, key counts and reasons, notes."""
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


@dataclass
class _Renamed:
    """A source checkpoint after rename_all: what the conversion steps read (and add notes to)."""

    source: str
    name: str  # the file, for messages
    mapped: dict[str, Tensor]  # our key -> source tensor
    pairs: list[tuple[str, str]]  # (source key, our key)
    dropped: list[tuple[str, str]]  # (source key, reason)
    notes: list[str]


@dataclass
class _Settings:
    """Config fields of a full-model conversion by section, before the user's overrides."""

    model: dict[str, Any]
    data: dict[str, Any]
    eval: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    palette: list[tuple[int, int, int]] | None = None


def convert_checkpoint(
    src: str | os.PathLike | Mapping[str, Any],
    source: str = "reference",
    *,
    overrides: Sequence[str] = (),
    allow_pickle: bool = False,
    assume_defaults: bool = False,
) -> ConversionResult:
    """Convert a checkpoint (file or dict) from ``source`` into our key layout, checking every key.

    ``overrides`` (``section.key=value``, full models only) go on top of the inferred config, e.g.
    ``model.output_stride=16`` for a reference model trained at OS16 (dilations are not in the weights).
    An mmseg checkpoint without config text converts with our mmseg defaults, said in a logged warning; one whose
    name shows a published config with another test pipeline (769x769) is refused unless ``overrides`` give
    its settings or ``assume_defaults`` accepts the defaults.
    """
    if source not in SOURCES:
        raise ConfigError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    state, extra, name, notes = read_source(src, allow_pickle=allow_pickle)
    mapped, pairs, dropped = rename_all(state, source, name)
    if isinstance(extra.get("step"), int):
        notes.append(f"the source checkpoint was saved at step {extra['step']}")
    renamed = _Renamed(source, name, mapped, pairs, dropped, notes)
    if source in FULL_MODEL_SOURCES:
        return _convert_model(renamed, extra, overrides, assume_defaults)
    if overrides:
        raise ConfigError("overrides apply to full-model conversions (reference, mmseg) only")
    return _convert_backbone(renamed)


def _convert_backbone(r: _Renamed) -> ConversionResult:
    """An ImageNet backbone file -> our ResNet of the depth and width its keys say, with the source's stem."""
    stem = EXPECTED_STEM[r.source]
    found = detect_format(list(r.mapped))
    if found is not None and EXPECTED_STEM.get(found, stem) != stem:
        raise ModelSourceError(
            f"{r.name}: the stem keys are those of a {EXPECTED_STEM[found]!r} stem: use --from {found}"
        )
    arch = {**infer_backbone(r.mapped), "stem": stem}
    backbone = BACKBONES[arch["backbone"]](stem=stem, width=arch["backbone_width"])
    sd, kept, filled = reconcile(r.mapped, r.pairs, backbone.state_dict(), r.source, r.name, r.dropped, r.notes)
    backbone.load_state_dict(sd, strict=True)
    return ConversionResult(r.source, sd, kept, r.dropped, filled, backbone=arch, notes=r.notes, model=backbone.eval())


def _convert_model(
    r: _Renamed, extra: Mapping[str, Any], overrides: Sequence[str], assume_defaults: bool
) -> ConversionResult:
    """A full segmentation model -> our model, built from the config the tensors, the source's settings, its
    metadata (mmseg) and the overrides say."""
    settings = _source_settings(r)
    meta = extra.get("meta") if isinstance(extra.get("meta"), Mapping) else {}
    found = _apply_mmseg_meta(settings, r, meta) if r.source == "mmseg" else {"read": [], "config_text": False}
    cfg = _model_config(settings, r, overrides)
    origin = conversion_origin(cfg, r.source, r.name, meta, found, overrides, assume_defaults)
    m = cfg.model
    class_names, palette = _names_for(settings, m.num_classes, r.notes)
    model = build_model(m)
    sd, kept, filled = reconcile(
        r.mapped,
        r.pairs,
        model.state_dict(),
        r.source,
        r.name,
        r.dropped,
        r.notes,
        optional=[("aux_head.", "auxiliary head left out (model.aux=false)")],
    )
    model.load_state_dict(sd, strict=True)
    return ConversionResult(
        r.source,
        sd,
        kept,
        r.dropped,
        filled,
        model_config=m,
        config=cfg,
        class_names=class_names,
        palette=palette,
        notes=r.notes,
        model=model.eval(),
        origin=origin,
    )


def _source_settings(r: _Renamed) -> _Settings:
    """What the source architecture computes (MODEL_SETTINGS, DATA_SETTINGS) and what its tensors say."""
    return _Settings(
        model={**MODEL_SETTINGS[r.source], **infer_model(r.mapped, r.source)}, data=dict(DATA_SETTINGS[r.source])
    )


def _bgr_to_rgb(mapped: dict[str, Tensor], key: str) -> None:
    # a BGR-trained first conv fed RGB: permute its input channels and the result is unchanged
    mapped[key] = mapped[key].flip(1)


def _apply_mmseg_meta(settings: _Settings, r: _Renamed, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Add what an mmseg checkpoint's meta says (its config text, class names, palette); a BGR model's first
    conv and mean/std are reordered to RGB. Returns parse_mmseg_meta's findings."""
    found = parse_mmseg_meta(meta)
    settings.model.update(found["model"])
    settings.data.update(found["data"])
    settings.eval.update(found["eval"])
    r.notes += found["notes"]
    settings.class_names, settings.palette = found.get("class_names"), found.get("palette")
    if found.get("bgr"):
        _bgr_to_rgb(r.mapped, "backbone.stem.0.weight")
        data = settings.data
        data["mean"], data["std"] = data["mean"][::-1], data["std"][::-1]
        r.notes.append("BGR model: the first conv's input channels and mean/std were reordered to RGB")
    return found


def _model_config(settings: _Settings, r: _Renamed, overrides: Sequence[str]) -> Config:
    """The full Config of the converted model: our defaults, the settings, then the user's overrides."""
    cfg = Config()
    cfg.data.dataset = DATASETS_BY_CLASSES.get(settings.model["num_classes"], cfg.data.dataset)
    base = cfg.to_dict()
    base["model"].update(settings.model, pretrained_backbone=None)
    base["data"].update(settings.data)
    base["eval"].update(settings.eval)
    cfg = load_config(None, overrides, base=base)
    m = cfg.model
    if r.source == "reference" and not any(o.split("=", 1)[0].strip() == "data.eval_pad_multiple" for o in overrides):
        cfg.data.eval_pad_multiple = m.output_stride  # pad_inf pads to 1 mod settings.STRIDE
    if r.source == "mmseg" and m.backbone in ("resnet18", "resnet34") and m.output_stride != 32:
        raise ModelSourceError(
            f"{r.name}: mmseg's ResNet-18/34 BasicBlock dilates only its first 3x3 conv, ours both: a "
            f"dilated (OS{m.output_stride}) {m.backbone} cannot be reproduced exactly "
            "(only model.output_stride=32 converts)"
        )
    return cfg


def _names_for(
    settings: _Settings, num_classes: int, notes: list[str]
) -> tuple[list[str] | None, list[tuple[int, int, int]] | None]:
    """The checkpoint's class names and palette, each kept only when it has one entry per class."""
    class_names, palette = settings.class_names, settings.palette
    if class_names is not None and len(class_names) != num_classes:
        notes.append(f"ignored {len(class_names)} class names from the checkpoint for {num_classes} classes")
        class_names = palette = None
    if palette is not None and len(palette) != num_classes:
        palette = None
    return class_names, palette


def convert(
    src: str | os.PathLike | Mapping[str, Any],
    dst: str | os.PathLike,
    source: str = "reference",
    *,
    overrides: Sequence[str] = (),
    allow_pickle: bool = False,
    assume_defaults: bool = False,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert and write: a model folder (full models, via save_pretrained; no model card: push_to_hub writes
    it when the folder is published) or a backbone .safetensors file."""
    dst = Path(dst)
    full = source in FULL_MODEL_SOURCES
    if full and dst.is_file():
        raise ConfigError(f"{dst} is a file: a full-model conversion writes a model folder")
    if not full and dst.suffix != ".safetensors":
        raise ConfigError(f"{dst}: a backbone conversion writes one .safetensors file; name it *.safetensors")
    if dst.exists() and not overwrite and (dst.is_file() or any(dst.iterdir())):
        raise ConfigError(f"{dst} already exists; choose a new path or pass overwrite=True (CLI: --overwrite)")
    result = convert_checkpoint(
        src, source, overrides=overrides, allow_pickle=allow_pickle, assume_defaults=assume_defaults
    )
    if full:
        assert result.config is not None and result.model is not None
        save_pretrained(
            result.model,
            result.config,
            dst,
            class_names=result.class_names,
            palette=result.palette,
            origin=result.origin,
        )
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:  # a failed write keeps an earlier file (with --overwrite) as it was
            save_file(
                {k: v.clone().contiguous() for k, v in result.state_dict.items()},
                str(tmp),
                metadata={
                    "format": BACKBONE_FORMAT,
                    "converted_from": source,
                    **{k: str(v) for k, v in (result.backbone or {}).items()},
                },
            )
    return result
