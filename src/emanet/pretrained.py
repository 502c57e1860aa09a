"""Shareable model folders and one loader for every kind of local model source.

A model folder holds ``model.safetensors`` (the state dict, buffers included: the EM bases travel with the
weights) and ``config.json`` (the resolved run config, class names and palette); whoever publishes it adds
the ``README.md`` model card (deploy/model_card.py), ``emanet eval`` its ``eval.json``. The file names are
defined here, once. Nothing needs a network.

``load_model(source)`` accepts a model folder, a checkpoint file or a run folder (its newest checkpoint);
predict, eval and export all go through it. A Hugging Face Hub repo is downloaded first by
``deploy.hub.resolve_source``, which callers ask before loading.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emanet.checkpoint import atomic_path, latest_checkpoint, load_checkpoint, write_text_atomic
from emanet.config import Config, load_config
from emanet.data.palettes import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    VOC_CLASSES,
    Palette,
    distinct_palette,
    voc_palette,
)
from emanet.errors import ConfigError, ModelSourceError
from emanet.fields import from_dict
from emanet.models.backbone import read_weights_file
from emanet.models.emanet import ModelConfig, build_model

logger = logging.getLogger(__name__)

FORMAT = "emanet-model"
VERSION = 1
# the files of a model folder (and of a Hub repo: it is a model folder)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"  # the model card, written by whoever publishes the folder (push_to_hub)
EVAL = "eval.json"  # written by `emanet eval FOLDER` (a run folder holds one too)


@dataclass
class LoadedModel:
    """What ``load_model`` returns: the model in eval mode and what predicting with it needs."""

    model: nn.Module  # in eval mode, on the requested device
    config: Config
    class_names: list[str]
    palette: Palette
    source: Path


def default_class_names(cfg: Config) -> list[str]:
    """The dataset's class names when ``cfg`` has its class count, else ``class_0``, ``class_1`` ..."""
    n = cfg.model.num_classes
    known = {"voc": VOC_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "ade20k": ADE20K_CLASSES}
    names = known.get(cfg.data.dataset)
    if names is not None and len(names) == n:
        return list(names)
    return ["background" if i == 0 and cfg.data.dataset == "synthetic" else f"class_{i}" for i in range(n)]


def default_palette(cfg: Config) -> Palette:
    """The dataset's palette when it has one for ``cfg``'s classes, else distinct colours."""
    n = cfg.model.num_classes
    if cfg.data.dataset == "cityscapes" and n == len(CITYSCAPES_PALETTE):
        return list(CITYSCAPES_PALETTE)
    if cfg.data.dataset == "voc":
        return voc_palette(n)
    return distinct_palette(n)


def carried_config(model: nn.Module) -> Config:
    """The run config a model carries: the one it was loaded with (``model.pretrained_meta``), with the model
    section it was built from (``model.config``); a model built by a builder: the defaults around its
    ModelConfig."""
    model_config = getattr(model, "config", None)
    if not isinstance(model_config, ModelConfig):
        raise ConfigError(
            f"this {type(model).__name__} carries no ModelConfig (model.config): build it with emanet's builders "
            "or build_model, or pass the config: save_pretrained(model, config, folder)"
        )
    saved = (getattr(model, "pretrained_meta", None) or {}).get("config")
    cfg = from_dict(Config, saved) if saved else Config()
    return dataclasses.replace(cfg, model=model_config)


def _if_sized(values: list | None, config: Config) -> list | None:
    """Carried class names or colours, only while they fit the model's number of classes."""
    return list(values) if values and len(values) == config.model.num_classes else None


class _ConfigNotWritten(Exception):
    """Carries config.json's OSError past the weights' atomic_path, which names its own file in the OSErrors
    it re-raises."""


def save_pretrained(
    model: nn.Module,
    config: Config | str | Path | None,
    folder: str | Path | None = None,
    *,
    class_names: list[str] | None = None,
    palette: Palette | None = None,
    origin: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json``; returns the folder. ``origin`` (where the
    model came from: a converted file or a training run) goes into config.json for the model card.

    ``save_pretrained(model, folder)`` (or ``config=None``): the config the model carries (``model.config``, on
    top of the run config a loaded model came with) and its class names and palette, when it has them.
    ``save_pretrained(model, config, folder)``: that config.

    Both are written to temporaries beside them first and renamed only when both are complete
    (``checkpoint.atomic_path``): a full disk leaves a folder's earlier files as they were, and an OSError
    names the file. No model card: as in transformers, the card is written by whoever publishes
    (``deploy.hub.push_to_hub``).
    """
    if folder is None and isinstance(config, (str, Path)):  # save_pretrained(model, folder)
        config, folder = None, config
    if folder is None:
        raise ConfigError("save_pretrained needs a folder: save_pretrained(model, folder)")
    if config is None:
        config = carried_config(model)
        carried = getattr(model, "pretrained_meta", None) or {}
        class_names = class_names if class_names is not None else _if_sized(carried.get("class_names"), config)
        palette = palette if palette is not None else _if_sized(carried.get("palette"), config)
    elif not isinstance(config, Config):
        raise ConfigError(f"save_pretrained: config must be an emanet.config.Config or None, got {config!r}")
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(class_names) if class_names is not None else default_class_names(config)
    colours = [tuple(int(v) for v in c) for c in (palette if palette is not None else default_palette(config))]
    if len(names) != config.model.num_classes:
        raise ConfigError(f"class_names has {len(names)} entries for {config.model.num_classes} classes")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "class_names": names,
        "palette": [list(c) for c in colours],
    }
    if origin is not None:
        meta["origin"] = origin
    # the weights' temporary is complete before config.json is written and both are renamed: a failed write
    # leaves the old pair, never new weights beside an old config
    try:
        with atomic_path(folder / WEIGHTS) as weights:
            save_file(state, str(weights), metadata={"format": FORMAT, "version": str(VERSION)})
            try:
                write_text_atomic(folder / CONFIG, json.dumps(meta, indent=2))
            except OSError as e:
                raise _ConfigNotWritten(e) from None
    except _ConfigNotWritten as failed:
        raise failed.args[0] from None
    return folder


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a model folder: model.safetensors and config.json in a directory."""
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def _read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ModelSourceError(f"{folder / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise ModelSourceError(f"{folder / CONFIG}: not an emanet model folder config (expected format '{FORMAT}')")
    if int(meta.get("version", 0)) > VERSION:
        raise ModelSourceError(
            f"{folder}: model folder version {meta['version']} is newer than this emanet ({VERSION})"
        )
    return read_weights_file(folder / WEIGHTS, what="model weights"), meta


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ModelSourceError(
                f"{source}: weights do not match the config's model: {key} has shape "
                f"{tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelSourceError(
            f"{source}: weights do not match the config's model; missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )


def load_model(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    overrides: list[str] | tuple[str, ...] = (),
    config: Config | None = None,
) -> LoadedModel:
    """A model folder, a checkpoint file or a run folder -> the model in eval mode plus its config.

    ``overrides`` (``section.key=value``) apply on top of the saved config, e.g. ``model.eval_stages=5``;
    ``config`` replaces the saved config altogether (its model must match the weights). A Hub repo is
    resolved to its local folder first: ``load_model(deploy.hub.resolve_source("hf://user/repo"))``.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(
            f"model source not found: {source} (expected a model folder, a checkpoint file or a run folder)"
        )
    if source.suffix.lower() == ".onnx":  # an exported graph has no PyTorch weights to rebuild a model from
        raise ModelSourceError(
            f"{source}: an ONNX file runs with `emanet predict` and `emanet eval` (deploy/onnx_model.py); this "
            "command needs the model it was exported from (a model folder, a checkpoint file or a run folder)"
        )
    class_names = palette = None
    if is_model_folder(source):
        state, meta = _read_folder(source)
        saved = meta["config"]
        class_names, palette = meta.get("class_names"), meta.get("palette")
    else:
        path = source
        if source.is_dir():
            latest = latest_checkpoint(source)
            if latest.path is None and latest.damaged:
                reasons = [damaged.error for damaged in latest.damaged]
                raise ModelSourceError(
                    f"{source}: no readable checkpoint in this run folder:\n  " + "\n  ".join(reasons)
                )
            if latest.path is None:
                raise FileNotFoundError(
                    f"{source}: neither a model folder ({WEIGHTS} + {CONFIG}) nor a run "
                    "folder with checkpoints (iter_*.pt)"
                )
            for damaged in latest.damaged:
                logger.warning(f"skipping damaged checkpoint: {damaged.error}; trying an older one")
            path = latest.path
        ckpt = load_checkpoint(path)
        state, saved = ckpt["model"], ckpt.get("config")
        class_names, palette = ckpt.get("class_names"), ckpt.get("palette")  # absent in older checkpoints
        if saved is None:
            raise ModelSourceError(f"{path}: checkpoint has no saved config; cannot rebuild its model")
        source = path
    if config is not None:
        cfg = config
    else:
        cfg = load_config(None, overrides, base=saved) if overrides else from_dict(Config, saved)
    # the saved weights replace everything; the ImageNet file named at training time need not exist here
    model = build_model(dataclasses.replace(cfg.model, pretrained_backbone=None))
    _load_state(model, state, source)
    model.to(device).eval()
    names = list(class_names) if class_names else default_class_names(cfg)
    colours = [tuple(int(v) for v in c) for c in palette] if palette else default_palette(cfg)
    # what model.save_pretrained(folder) writes again: the run config, the class names and colours
    model.pretrained_meta = {"config": cfg.to_dict(), "class_names": names, "palette": [list(c) for c in colours]}
    return LoadedModel(model=model, config=cfg, class_names=names, palette=colours, source=source)
