"""Flags and helpers that several subcommands share: device, precision, compile, progress, and the
``section.key=value`` overrides they turn into."""

from __future__ import annotations

import argparse
import typing

from emanet.config import Config, load_config
from emanet.runtime import Precision

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


def add_no_progress(p: argparse.ArgumentParser, *, help: str | None = NO_PROGRESS_HELP) -> None:
    p.add_argument("--no-progress", action="store_true", help=help)


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
