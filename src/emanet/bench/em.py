"""Benchmark (a): EM attention, C=512, K=64, T=3, B=1 at 33^2..129^2.

em_attention (on NCHW input, and on channels_last input as prepared models feed it) against a plain
transcription of the reference loop, the EMAUnit against the non-local block; inference and training step.
Median latency, achieved FLOP/s, and peak memory (a fresh subprocess per case: ru_maxrss over its first call
minus the RSS before it).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
from collections.abc import Callable

import torch
from torch import nn

from emanet.bench.timing import count_flops, interleaved
from emanet.models.em import EMAUnit, em_attention
from emanet.models.heads import NonLocal2d

logger = logging.getLogger(__name__)

C, K, T = 512, 64, 3
SIZES = (33, 65, 97, 129)


def plain_reference_em(x: torch.Tensor, bases: torch.Tensor, stages: int) -> torch.Tensor:
    """The reference loop as written there: permute, repeat, explicit z_bar, bmm."""
    b, c, h, w = x.shape
    x = x.view(b, c, h * w)
    mu = bases.repeat(b, 1, 1)
    for _ in range(stages):
        z = torch.softmax(torch.bmm(x.permute(0, 2, 1), mu), dim=2)
        z_ = z / (1e-6 + z.sum(dim=1, keepdim=True))
        mu = torch.bmm(x, z_)
        mu = mu / (1e-6 + mu.norm(dim=1, keepdim=True))
    return torch.bmm(mu, z.permute(0, 2, 1)).view(b, c, h, w)


def _make(variant: str, size: int, mode: str) -> Callable[[], object]:
    """A closure running one case; inputs and modules are built here, outside the timed call."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(1, C, size, size))
    bases = nn.functional.normalize(torch.randn(1, C, K), dim=1)
    if variant == "em_attention_nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    if variant in ("em_attention", "em_attention_nhwc", "plain_reference"):
        f = plain_reference_em if variant == "plain_reference" else em_attention

        def run():
            with torch.no_grad():
                return f(x, bases, T)

        return run
    module = EMAUnit(C, K, T) if variant == "ema_unit" else NonLocal2d(C)
    if mode == "inference":
        module.eval()

        def run():
            with torch.inference_mode():
                return module(x)

        return run
    module.train()
    xg = x.clone().requires_grad_()

    def step():
        module(xg).sum().backward()
        module.zero_grad(set_to_none=True)
        xg.grad = None

    return step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe_memory(variant: str, size: int, mode: str) -> int:
    """Peak extra bytes of one first call, measured in a fresh process (ru_maxrss only grows)."""
    code = (
        "import json, sys; from emanet.bench.em import _memory_child; "
        f"print(json.dumps(_memory_child({variant!r}, {size}, {mode!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_child(variant: str, size: int, mode: str) -> int:
    torch.set_flush_denormal(True)
    run = _make(variant, size, mode)
    before = _rss_bytes()
    run()
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


GROUPS = [  # variants compared directly run interleaved with each other only, so a (N, N) non-local
    # buffer does not evict the EM operands from cache between their calls
    [("em_attention", "inference"), ("em_attention_nhwc", "inference"), ("plain_reference", "inference")],
    [("ema_unit", "inference"), ("nonlocal", "inference")],
    [("ema_unit", "train_step"), ("nonlocal", "train_step")],
]


def bench_em(sizes=SIZES, budget_s: float = 2.0, memory: bool = True) -> list[dict]:
    rows = []
    for size in sizes:
        for group in GROUPS:
            fns = {f"{v}/{m}": _make(v, size, m) for v, m in group}
            flops = {k: count_flops(fn) for k, fn in fns.items()}
            med = interleaved(fns, budget_s=budget_s)
            for (variant, mode), key in zip(group, fns):
                row = {
                    "size": size,
                    "pixels": size * size,
                    "variant": variant,
                    "mode": mode,
                    "median_ms": med[key] * 1e3,
                    "gflop": flops[key] / 1e9,
                    "gflops_per_s": flops[key] / med[key] / 1e9,
                }
                if memory:
                    row["peak_mb"] = probe_memory(variant, size, mode) / 2**20
                rows.append(row)
                ms, rate = row["median_ms"], row["gflops_per_s"]
                logger.info(f"  {size:>4}^2 {variant:<16}{mode:<11}{ms:>10.2f} ms {rate:>8.1f} GFLOP/s")
            del fns
    return rows
