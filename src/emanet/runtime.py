"""Where and how a model runs, shared by training, evaluation and inference: the device, the autocast
precision, the opt-in ``torch.compile``, and this process's place in a torchrun group (``shard``).

Imports nothing of emanet's but its error types, so deployment code (predict, export) does not pull in the
training engine.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from emanet.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]  # autocast dtype; fp16 needs CUDA (with a grad scaler)


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return device


def check_precision(device: torch.device, precision: Precision) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision fp16 needs CUDA, but the device is {device}; use bf16 (or fp32) on CPU")


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Mixed precision for convs and matmuls; EM attention keeps its iterations in float32 itself."""
    check_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# Opt-in torch.compile: off by default, since a cold compile costs ~20-30 s on a 2-core CPU before the first step
# (benchmarks/results.md has what it buys afterwards). The EM core is compile-friendly: no host syncs inside the
# model (the bases' moving-average update decides "nothing accumulated" on the device) and no branch on the batch
# size in compiled code, so a model compiles to one graph without breaks.


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(module)`` when ``enabled``, else ``module`` itself.

    The compiled wrapper shares parameters and buffers with ``module`` (save and load through the original);
    shapes are specialised first and made dynamic on the first recompile (torch's default), so inputs of a
    few different sizes cost a recompile each, not one per image.
    """
    if not enabled:
        return module
    return torch.compile(module)


# ----------------------------------------------------------------------------- torchrun ranks


def shard() -> tuple[int, int]:
    """(rank, world size) of the running process group, (0, 1) without one: for code handed no DistEnv."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_lists(items: list[Any]) -> list[Any]:
    """Every rank's list, concatenated in rank order, on every rank (the list itself alone)."""
    _, world = shard()
    if world == 1:
        return items
    gathered: list[list[Any]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def machine() -> dict[str, Any]:
    """What a measured figure depends on beyond the code and the config (benchmarks and studies record it):
    floating-point sums differ between CPUs and thread counts, so the same command gives other figures
    elsewhere."""
    cpu = platform.processor() or platform.machine() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
