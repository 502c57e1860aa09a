"""Speed benchmarks (not tests): `emanet bench` writes benchmarks/results.md and results.json.

(a) EM attention, C=512, K=64, T=3, B=1 at 33^2..129^2: em_attention vs a plain transcription of the
    reference loop, the EMAUnit vs the non-local block; inference and training step. Median latency,
    peak memory (a fresh subprocess per case: ru_maxrss over its first call minus the RSS before it),
    achieved FLOP/s, and the machine's float32 / bfloat16 matmul FLOP/s measured in the same run.
(b) Whole EMANet-ResNet-101 OS8 at 513x513: median latency against the lower bound its multiply-adds imply
    at the measured matmul rate, float32 and bfloat16 autocast (EM kept in float32).

Variants compared directly run interleaved (one call of each in turn) so a noisy, shared machine slows
them alike; ratios come from the same run.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from emanet.em import EMAUnit, em_attention
from emanet.models.heads import NonLocal2d

C, K, T = 512, 64, 3
SIZES = (33, 65, 97, 129)


# ----------------------------------------------------------------------------- measuring


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "amx_bf16": "amx_bf16" in flags,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


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


# ----------------------------------------------------------------------------- the cases


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
    if variant in ("em_attention", "plain_reference"):
        f = em_attention if variant == "em_attention" else plain_reference_em

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
        "import json, sys; from emanet.benchmark import _memory_child; "
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
    [("em_attention", "inference"), ("plain_reference", "inference")],
    [("ema_unit", "inference"), ("nonlocal", "inference")],
    [("ema_unit", "train_step"), ("nonlocal", "train_step")],
]


def bench_em(sizes=SIZES, budget_s: float = 2.0, memory: bool = True, log=print) -> list[dict]:
    rows = []
    for size in sizes:
        for group in GROUPS:
            fns = {f"{v}/{m}": _make(v, size, m) for v, m in group}
            flops = {k: count_flops(fn) for k, fn in fns.items()}
            med = interleaved(fns, budget_s=budget_s)
            for (variant, mode), key in zip(group, fns):
                row = {"size": size, "pixels": size * size, "variant": variant, "mode": mode,
                       "median_ms": med[key] * 1e3, "gflop": flops[key] / 1e9,
                       "gflops_per_s": flops[key] / med[key] / 1e9}  # fmt: skip
                if memory:
                    row["peak_mb"] = probe_memory(variant, size, mode) / 2**20
                rows.append(row)
                ms, rate = row["median_ms"], row["gflops_per_s"]
                log(f"  {size:>4}^2 {variant:<16}{mode:<11}{ms:>10.2f} ms {rate:>8.1f} GFLOP/s")
            del fns
    return rows


# ----------------------------------------------------------------------------- whole model


def bench_model(size: int = 513, repeats: int = 5, log=print) -> list[dict]:
    from emanet.flops import count_model
    from emanet.models.emanet import ModelConfig, build_model
    from emanet.models.fuse import prepare_for_inference

    torch.manual_seed(0)
    model = build_model(ModelConfig())  # EMANet-ResNet-101, deep stem, OS8, K=64, T=3
    # Calibrate BN running stats on one small batch so activations have realistic scales.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 129, 129))
    model.eval()
    macs = count_model(model, (size, size)).total.macs
    x = torch.randn(1, 3, size, size)

    def run(m, x, bf16=False):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return m(x)

    ref = run(model, x).float()
    fast = prepare_for_inference(copy.deepcopy(model), channels_last=True, fold_bn=True)
    xc = x.contiguous(memory_format=torch.channels_last)
    fns = {
        "eager fp32": lambda: run(model, x),
        "folded+channels_last fp32": lambda: run(fast, xc),
        "eager bf16 autocast": lambda: run(model, x, True),
        "folded+channels_last bf16 autocast": lambda: run(fast, xc, True),
    }
    med = interleaved(fns, budget_s=repeats * 4.0, max_repeats=repeats)
    rows = []
    for name, t in med.items():
        out = fns[name]().float()
        rel = ((out - ref).norm() / ref.norm()).item()
        rows.append({"variant": name, "median_s": t, "gmacs": macs / 1e9, "rel_err_vs_eager_fp32": rel})
        log(f"  {name:<36}{t:>8.3f} s  rel.err {rel:.2e}")
    return rows


# ----------------------------------------------------------------------------- report


def run_benchmarks(out_dir: str | Path = "benchmarks", quick: bool = False, parts=("em", "model"), log=print) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Flush denormals to zero, as CPU inference deployments do: the non-local block's near one-hot softmax
    # is full of denormals that otherwise slow its (N, N) GEMM about 8x here (measured), flattering EM.
    torch.set_flush_denormal(True)
    result: dict = {"machine": machine()}
    log(f"machine: {result['machine']}")
    result["matmul_gflops"] = {
        "float32": matmul_flops(torch.float32) / 1e9,
        "bfloat16": matmul_flops(torch.bfloat16) / 1e9,
    }
    log(f"matmul 2048^3: {result['matmul_gflops']}")
    if "em" in parts:
        log("(a) EM attention, C=512 K=64 T=3 B=1")
        sizes = (33, 65) if quick else SIZES
        result["em"] = bench_em(sizes, budget_s=0.5 if quick else 2.0, memory=not quick, log=log)
    if "model" in parts:
        log("(b) EMANet-ResNet-101 OS8 at 513x513")
        result["model"] = bench_model(size=129 if quick else 513, repeats=2 if quick else 5, log=log)
    result["matmul_gflops_after"] = {"float32": matmul_flops(torch.float32) / 1e9}
    (out / ("results_quick.json" if quick else "results.json")).write_text(json.dumps(result, indent=2))
    md = format_report(result)
    (out / ("results_quick.md" if quick else "results.md")).write_text(md)
    log(md)
    return result


def _f32_rate(r: dict) -> float:
    """The conservative (higher) of the float32 matmul rates measured before and after: shares of it are
    lower bounds of efficiency on this shared machine."""
    return max(r["matmul_gflops"]["float32"], r["matmul_gflops_after"]["float32"])


def format_report(r: dict) -> str:
    m = r["machine"]
    f32, bf16 = _f32_rate(r), r["matmul_gflops"]["bfloat16"]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}, AMX-BF16: {m['amx_bf16']}, {m['date']}. Shared machine: medians of interleaved runs.",
        "",
        f"Matmul 2048^3 in this run: float32 {f32:.1f} GFLOP/s, bfloat16 {bf16:.1f} GFLOP/s "
        f"(float32 again at the end: {r['matmul_gflops_after']['float32']:.1f}). Percentages and bounds use the "
        f"higher float32 figure ({f32:.1f}).",
    ]
    if "em" in r:
        lines += ["", "## (a) EM attention, C=512, K=64, T=3, B=1", "",
                  "| size | variant | mode | median ms | GFLOP | GFLOP/s | % fp32 matmul | peak MB | ns/pixel |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in r["em"]:
            peak = f"{row['peak_mb']:.1f}" if "peak_mb" in row else "-"
            lines.append(
                f"| {row['size']}^2 | {row['variant']} | {row['mode']} | {row['median_ms']:.2f} | {row['gflop']:.2f} | "
                f"{row['gflops_per_s']:.1f} | {100 * row['gflops_per_s'] / f32:.0f}% | {peak} | "
                f"{1e6 * row['median_ms'] / row['pixels']:.1f} |"
            )
        lines += ["", "Ratios (same run):", ""]
        by = {(row["size"], row["variant"], row["mode"]): row for row in r["em"]}
        for size in sorted({row["size"] for row in r["em"]}):
            ours, plain = by[(size, "em_attention", "inference")], by[(size, "plain_reference", "inference")]
            ema, nl = by[(size, "ema_unit", "inference")], by[(size, "nonlocal", "inference")]
            ema_t, nl_t = by[(size, "ema_unit", "train_step")], by[(size, "nonlocal", "train_step")]
            lines.append(
                f"- {size}^2: plain/em_attention {plain['median_ms'] / ours['median_ms']:.2f}x; "
                f"non-local/em_attention {nl['median_ms'] / ours['median_ms']:.1f}x; "
                f"non-local/EMAUnit inference {nl['median_ms'] / ema['median_ms']:.1f}x, "
                f"train step {nl_t['median_ms'] / ema_t['median_ms']:.1f}x"
            )
    if "model" in r:
        lines += ["", "## (b) EMANet-ResNet-101 OS8 inference, 1x3x513x513", "",
                  "| variant | median s | GMACs | bound s (2*MACs / matmul rate) | ratio to bound | rel. err vs fp32 |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for row in r["model"]:
            rate = bf16 if "bf16" in row["variant"] else f32
            bound = 2 * row["gmacs"] / rate
            lines.append(
                f"| {row['variant']} | {row['median_s']:.3f} | {row['gmacs']:.1f} | {bound:.3f} | "
                f"{row['median_s'] / bound:.2f}x | {row['rel_err_vs_eager_fp32']:.2e} |"
            )
    lines += ["", "## Targets (computed from the tables above)", ""] + _targets(r)
    return "\n".join(lines) + "\n"


def _targets(r: dict) -> list[str]:
    f32, out = _f32_rate(r), []

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if "em" in r:
        by = {(row["size"], row["variant"], row["mode"]): row for row in r["em"]}
        sizes = sorted({row["size"] for row in r["em"]})
        for size in (65, 97):
            if (size, "em_attention", "inference") in by:
                share = by[(size, "em_attention", "inference")]["gflops_per_s"] / f32
                out.append(
                    f"- em_attention >= 60% of fp32 matmul at {size}^2: {100 * share:.0f}% -> {verdict(share >= 0.6)}"
                )
        ratios = [
            by[(s, "plain_reference", "inference")]["median_ms"] / by[(s, "em_attention", "inference")]["median_ms"]
            for s in sizes
        ]
        out.append(f"- never slower than the plain loop: plain/ours {', '.join(f'{x:.2f}' for x in ratios)} "
                   f"-> {verdict(min(ratios) >= 1.0)}")  # fmt: skip
        for variant in ("em_attention", "ema_unit"):
            per_px = [by[(s, variant, "inference")]["median_ms"] * 1e6 / s**2 for s in sizes]
            out.append(
                f"- {variant} cost per pixel (constant if linear in H*W): ns/pixel "
                f"{', '.join(f'{x:.0f}' for x in per_px)} (max/min {max(per_px) / min(per_px):.2f})"
            )
        if (97, "nonlocal", "inference") in by:
            nl = by[(97, "nonlocal", "inference")]
            em, unit = by[(97, "em_attention", "inference")], by[(97, "ema_unit", "inference")]
            x_em, x_unit = nl["median_ms"] / em["median_ms"], nl["median_ms"] / unit["median_ms"]
            out.append(
                f"- >= 30x cheaper than non-local at 97^2: non-local block / em_attention {x_em:.1f}x "
                f"({nl['gflop'] / em['gflop']:.1f}x in FLOPs) -> {verdict(x_em >= 30)}; "
                f"non-local block / EMA unit {x_unit:.1f}x ({nl['gflop'] / unit['gflop']:.1f}x in FLOPs)"
            )
    if "model" in r:
        fp32 = min((row for row in r["model"] if "fp32" in row["variant"]), key=lambda row: row["median_s"])
        bf16 = min((row for row in r["model"] if "bf16" in row["variant"]), key=lambda row: row["median_s"])
        ratio = fp32["median_s"] / (2 * fp32["gmacs"] / f32)
        out.append(f"- float32 inference within 1.5x of its matmul bound: best ({fp32['variant']}) {ratio:.2f}x "
                   f"-> {verdict(ratio <= 1.5)}")  # fmt: skip
        speed = fp32["median_s"] / bf16["median_s"]
        out.append(
            f"- bf16 autocast >= 2x faster than float32: {speed:.2f}x ({bf16['variant']} vs {fp32['variant']}), "
            f"logits' relative error {bf16['rel_err_vs_eager_fp32']:.2e} -> {verdict(speed >= 2)}"
        )
    return out


if __name__ == "__main__":  # python -m emanet.benchmark [--quick] | --report results.json
    if "--report" in sys.argv:  # re-render results.md from a results.json
        src = Path(sys.argv[sys.argv.index("--report") + 1])
        (src.parent / "results.md").write_text(format_report(json.loads(src.read_text())))
    else:
        run_benchmarks(quick="--quick" in sys.argv)
