"""Speed benchmarks (not tests): `emanet bench` runs the parts in order and writes benchmarks/results.md and
results.json, rewritten after each part so an interrupted run keeps what it measured.

(a) EM attention, C=512, K=64, T=3, B=1 at 33^2..129^2 (em.py): em_attention vs a plain transcription
    of the reference loop, the EMAUnit vs the non-local block; inference and training step. Median latency,
    peak memory (a fresh subprocess per case: ru_maxrss over its first call minus the RSS before it),
    achieved FLOP/s, and the machine's float32 / bfloat16 matmul FLOP/s measured in the same run.
(b) Whole EMANet-R50 and -R101 OS8 at 513x513 (models.py): the eager forward, the prepared model's
    forward and the Predictor's whole call (eager and default = prepared), float32 and bfloat16 autocast (EM
    kept in float32); medians against the lower bound the multiply-adds imply at the measured matmul rate.
(c) torch.compile (opt-in, models.py): cold compile and steady medians, inference and one training step.

Variants compared directly run interleaved (one call of each in turn, timing.py) so a noisy, shared
machine slows them alike; ratios come from the same run. The report is rendered by bench_report.py;
`python -m emanet.bench.cpu --report results.json` re-renders it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from emanet.bench.em import SIZES, bench_em
from emanet.bench.models import bench_compile, bench_model
from emanet.bench.report import format_report
from emanet.bench.timing import machine, machine_load, matmul_flops
from emanet.checkpoint import write_text_atomic

logger = logging.getLogger(__name__)
PARTS = ("em", "model", "compile")


def run_benchmarks(
    out_dir: str | Path = "benchmarks",
    quick: bool = False,
    parts=PARTS,
    *,
    memory: bool = True,
    repeats: int = 5,
) -> Path:
    """Run the parts in order; the report is rewritten after each, so an interrupted run keeps what it
    measured. ``memory``: the per-case peak-memory subprocesses of (a); ``repeats``: of (b). Returns the
    report's .md path (the .json lies beside it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "results_quick" if quick else "results"
    # Flush denormals to zero, as CPU inference deployments do: the non-local block's near one-hot softmax
    # is full of denormals that otherwise slow its (N, N) GEMM about 8x here (measured), flattering EM.
    torch.set_flush_denormal(True)
    result: dict = {"machine": machine(), "quick": quick, "load_before": machine_load()}
    logger.info(f"machine: {result['machine']}, load {result['load_before']}")
    result["matmul_gflops"] = {
        "float32": matmul_flops(torch.float32) / 1e9,
        "bfloat16": matmul_flops(torch.bfloat16) / 1e9,
    }
    logger.info(f"matmul 2048^3: {result['matmul_gflops']}")
    started = time.perf_counter()

    def write(final: bool = False) -> None:
        # the closing float32 rate is measured once, at the end; a partial report repeats the opening one
        after = matmul_flops(torch.float32) / 1e9 if final else result["matmul_gflops"]["float32"]
        result["matmul_gflops_after"] = {"float32": after}
        result["load_after"] = machine_load()
        result["minutes"] = (time.perf_counter() - started) / 60
        # each whole or not at all: a failed rewrite keeps the previous part's tables
        write_text_atomic(out / f"{stem}.json", json.dumps(result, indent=2))
        write_text_atomic(out / f"{stem}.md", format_report(result))

    if "em" in parts:
        logger.info("(a) EM attention, C=512 K=64 T=3 B=1")
        sizes = (33, 65) if quick else SIZES
        result["em"] = bench_em(sizes, budget_s=0.5 if quick else 2.0, memory=memory and not quick)
        write()
    if "model" in parts:
        size = 129 if quick else 513
        logger.info(f"(b) EMANet OS8 at {size}x{size}: eager forward, prepared forward, Predictor")
        result["model"] = bench_model(size=size, repeats=2 if quick else repeats)
        write()
    if "compile" in parts:
        if quick:
            logger.info("(c) torch.compile: skipped with --quick (a cold compile alone takes longer than a quick run)")
        else:
            logger.info("(c) torch.compile, EMANet-R50")
            result["compile"] = bench_compile()
    write(final=True)
    return out / f"{stem}.md"
