"""Measuring primitives of the benchmarks: the machine and its load, median seconds of a call and of calls
taken in turn (interleaved), the machine's matmul FLOP/s, and FLOP counts of a call; for a CUDA device, a
clock that drains the queue around each call, peak memory and host syncs."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from emanet import runtime


def machine() -> dict:
    """runtime.machine() and whether the CPU has AMX-BF16 (the benchmarks' tables show it)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {**runtime.machine(), "amx_bf16": "amx_bf16" in flags}


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], budget_s: float = 2.0, max_repeats: int = 30) -> dict:
    """Median seconds per call of each fn, calling them in turn; repeats sized to ~budget_s each."""
    est = {}
    for name, fn in fns.items():  # warm-up doubles as the estimate
        fn()
        t0 = time.perf_counter()
        fn()
        est[name] = time.perf_counter() - t0
    reps = {n: max(3, min(max_repeats, int(budget_s / max(t, 1e-6)))) for n, t in est.items()}
    times: dict[str, list[float]] = {n: [] for n in fns}
    for i in range(max(reps.values())):
        for name, fn in fns.items():
            if i < reps[name]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    return 2 * n**3 / median_time(lambda: a @ b, repeats)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def machine_load() -> dict:
    """The 1/5/15-minute load averages and the other processes' CPU use, as far as /proc tells."""
    try:
        one, five, fifteen = (float(v) for v in Path("/proc/loadavg").read_text().split()[:3])
    except (OSError, ValueError):
        return {}
    return {"loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen}


# ----------------------------------------------------------------------------- on a device (the GPU benchmark)


class Clock:
    """Wall time per call; on CUDA the queue is drained before and after, so a call's kernels count."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median(self, fn: Callable[[], object], warmup: int, steps: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(steps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def count_host_syncs(device: torch.device, fn: Callable[[], object]) -> int | None:
    """Synchronising CUDA calls made by ``fn`` (torch.cuda's sync debug mode, one warning per sync)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
