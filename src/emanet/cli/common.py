"""Flags and helpers that several subcommands share: device, precision, compile, progress, the
``section.key=value`` overrides they turn into, and the checks of an output before any work starts."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

from emanet.checkpoint import checkpoint_iteration, claim_folder
from emanet.config import Config, load_config
from emanet.errors import ConfigError
from emanet.pretrained import CONFIG as MODEL_CONFIG
from emanet.pretrained import WEIGHTS, is_model_folder
from emanet.runtime import Precision
from emanet.train.runs import RESERVED, run_contents

COMPILE_HELP = "torch.compile the model (opt-in: tens of seconds of compiling before the first image or step)"
NO_PREPARE_HELP = (
    "run the model as loaded: no BatchNorm folding or ReLU fusion, no channels_last (slower, same results)"
)
NO_PROGRESS_HELP = "no progress bar"


def add_precision(p: argparse.ArgumentParser, *, help: str, default: str | None = None) -> None:
    p.add_argument("--precision", choices=typing.get_args(Precision), default=default, help=help)


def add_compile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def add_no_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-prepare", action="store_true", help=NO_PREPARE_HELP)


def add_no_progress(p: argparse.ArgumentParser, *, help: str | None = None) -> None:
    p.add_argument("--no-progress", action="store_true", help=help or NO_PROGRESS_HELP)


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The positional overrides, then --device, --precision and --compile as the train.* keys they set."""
    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"train.device={args.device}")
    if getattr(args, "precision", None):
        overrides.append(f"train.precision={args.precision}")
    if getattr(args, "compile", False):
        overrides.append("train.compile=true")
    return overrides


def run_config(args: argparse.Namespace) -> Config:
    """``--config`` (a file or packaged recipe; default: the VOC recipe) with ``run_overrides`` on top."""
    return load_config(args.config, run_overrides(args))


# ----------------------------------------------------------------------------- outputs, checked before any work


def reserved(path: Path) -> str | None:
    """Why ``path`` is a file of a run or model folder that no command's output may replace, or None."""
    folder, name = path.parent, path.name
    if is_model_folder(folder) and name in (WEIGHTS, MODEL_CONFIG):
        return f"{name} belongs to the model folder {folder}"
    if run_contents(folder) and (name in RESERVED or checkpoint_iteration(name) >= 0):
        return f"{name} belongs to the run in {folder}"
    return None


def claim_output(path: str | Path, *, overwrite: bool, flag: str = "--out") -> Path:
    """An output file, checked before any work: never a reserved file of a run or model folder; an existing
    file only with --overwrite; its folder created (parents included) and writable."""
    path = Path(path)
    why = reserved(path)
    if why is not None:
        raise ConfigError(
            f"{flag} {path}: {why} and is never replaced, with or without --overwrite; choose another file"
        )
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: a folder; give a file name")
    if path.exists() and not overwrite:
        raise ConfigError(f"{flag} {path} exists; add --overwrite to replace it, or choose another name")
    claim_folder(path.parent)
    return path
