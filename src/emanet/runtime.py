"""Runtime helpers that training and inference share: the device and autocast precision.

Imports nothing of emanet's, so deployment code (predict, export) does not pull in the training engine.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]  # autocast dtype; fp16 needs CUDA (with a grad scaler)


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return device


def check_precision(device: torch.device, precision: Precision) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 needs CUDA, but the device is {device}; use bf16 (or fp32) on CPU")


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Mixed precision for convs and matmuls; EM attention keeps its iterations in float32 itself."""
    check_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
