"""Speed benchmarks (not tests): `emanet bench` writes benchmarks/results.md and results.json.

(a) EM attention, C=512, K=64, T=3, B=1 at 33^2..129^2: em_attention vs a plain transcription of the
    reference loop, the EMAUnit vs the non-local block; inference and training step. Median latency,
    peak memory (a fresh subprocess per case: ru_maxrss over its first call minus the RSS before it),
    achieved FLOP/s, and the machine's float32 / bfloat16 matmul FLOP/s measured in the same run.
(b) Whole EMANet-R50 and -R101 OS8 at 513x513: the eager forward, the prepared model's forward and the
    Predictor's whole call (eager and default = prepared), float32 and bfloat16 autocast (EM kept in
    float32); medians against the lower bound the multiply-adds imply at the measured matmul rate.
(c) torch.compile (opt-in): cold compile and steady medians, inference and one training step.

Variants compared directly run interleaved (one call of each in turn) so a noisy, shared machine slows
them alike; ratios come from the same run.
"""

from __future__ import annotations

import copy
import datetime
import functools
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
                log(f"  {size:>4}^2 {variant:<16}{mode:<11}{ms:>10.2f} ms {rate:>8.1f} GFLOP/s")
            del fns
    return rows


# ----------------------------------------------------------------------------- whole model

MODEL_BACKBONES = ("resnet50", "resnet101")


def calibrated_model(backbone: str = "resnet101", **overrides) -> nn.Module:
    """A randomly initialised EMANet (deep stem, OS8, K=64, T=3), BN statistics calibrated on one small
    batch so activations have realistic scales; eval mode."""
    from emanet.models.emanet import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, **overrides))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 129, 129))
    return model.eval()


def bench_model(size: int = 513, repeats: int = 5, backbones=MODEL_BACKBONES, log=print) -> list[dict]:
    """Per backbone, interleaved: the eager forward, the prepared model's forward, and the whole Predictor
    call (preprocessing, forward, softmax, argmax) on a size x size image, eager (prepare=False) and default
    (prepared), in float32 and bfloat16 autocast."""
    return [row for backbone in backbones for row in _bench_backbone(backbone, size, repeats, log)]


def _bench_backbone(backbone: str, size: int, repeats: int, log) -> list[dict]:
    from emanet.config import Config
    from emanet.flops import count_model
    from emanet.models.emanet import ModelConfig
    from emanet.models.fuse import prepare_for_inference
    from emanet.predict import Predictor

    model = calibrated_model(backbone)
    macs = count_model(model, (size, size)).total.macs
    cfg = Config()
    cfg.model = ModelConfig(backbone=backbone)
    image = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = image.numpy()
    fast = prepare_for_inference(copy.deepcopy(model))
    predictors = {
        (p, prep): Predictor(model, cfg, device="cpu", precision=p, prepare=prep)
        for p in ("fp32", "bf16")
        for prep in (False, True)
    }
    x = predictors[("fp32", False)].preprocess(image)[1][None]  # (1, 3, Hp, Wp): what the network sees

    def forward(m: nn.Module, bf16: bool = False) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return m(x)

    fns = {}
    for p in ("fp32", "bf16"):
        bf16 = p == "bf16"
        fns[(p, "eager forward")] = functools.partial(forward, model, bf16)
        fns[(p, "prepared forward")] = functools.partial(forward, fast, bf16)
        fns[(p, "Predictor prepare=False")] = functools.partial(predictors[(p, False)], image)
        fns[(p, "Predictor default (prepared)")] = functools.partial(predictors[(p, True)], image)
    med = interleaved({f"{p} {v}": fn for (p, v), fn in fns.items()}, budget_s=repeats * 4.0, max_repeats=repeats)
    ref = forward(model).float()
    ref_labels = ref.argmax(1)[0, : image.shape[0], : image.shape[1]].numpy()
    rows = []
    for (p, variant), fn in fns.items():
        out = fn()
        if isinstance(out, torch.Tensor):
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            labels = out.float().argmax(1)[0, : image.shape[0], : image.shape[1]].numpy()
        else:  # a Prediction
            rel, labels = None, out.labels
        agree = float((labels == ref_labels).mean())
        t, eager = med[f"{p} {variant}"], med[f"{p} eager forward"]
        rows.append(
            {
                "backbone": backbone,
                "size": size,
                "precision": p,
                "variant": variant,
                "median_s": t,
                "ratio_to_eager_forward": t / eager,
                "gmacs": macs / 1e9,
                "rel_err_vs_eager_fp32": rel,
                "label_agreement_vs_eager_fp32": agree,
            }
        )
        log(f"  {backbone} {p} {variant:<30}{t:>8.3f} s  {t / eager:.2f}x eager forward  labels {agree:.4f}")
    return rows


# ----------------------------------------------------------------------------- torch.compile


def bench_compile(
    size: int = 513, train_size: int = 129, repeats: int = 3, backbone: str = "resnet50", log=print
) -> list[dict]:
    """What the opt-in --compile buys on this CPU: cold compile (first call) and steady medians of
    (i) the prepared model's forward at size x size, float32 and bfloat16 autocast, compiled vs not, and
    (ii) one training step (forward, loss, backward, SGD) at batch 2 x train_size^2, compiled vs not."""
    from emanet.compiled import maybe_compile
    from emanet.losses import SegmentationLoss
    from emanet.models.fuse import prepare_for_inference

    rows = []
    fast = prepare_for_inference(calibrated_model(backbone))
    compiled = maybe_compile(fast, True)
    x = torch.randn(1, 3, size, size)

    def forward(m, bf16):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return m(x)

    for p in ("fp32", "bf16"):
        bf16 = p == "bf16"
        t0 = time.perf_counter()
        forward(compiled, bf16)
        cold = time.perf_counter() - t0
        want, got = forward(fast, bf16).float(), forward(compiled, bf16).float()
        rel = ((got - want).norm() / want.norm()).item()
        med = interleaved(
            {"eager": functools.partial(forward, fast, bf16), "compiled": functools.partial(forward, compiled, bf16)},
            budget_s=repeats * 3.0,
            max_repeats=repeats,
        )
        rows.append(
            {
                "case": f"prepared {backbone} forward {size}x{size}",
                "precision": p,
                "eager_s": med["eager"],
                "compiled_s": med["compiled"],
                "cold_first_call_s": cold,
                "rel_diff": rel,
            }
        )
        log(
            f"  compile {backbone} forward {p}: eager {med['eager']:.3f} s, compiled {med['compiled']:.3f} s, "
            f"first call {cold:.1f} s"
        )
    del fast, compiled

    torch.manual_seed(0)
    model = calibrated_model(backbone).train()
    criterion = SegmentationLoss(reduction="all")
    images = torch.randn(2, 3, train_size, train_size)
    labels = torch.randint(0, 21, (2, train_size, train_size))
    optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-4, momentum=0.9)
    net = maybe_compile(model, True)

    def step(m):
        loss = criterion(m(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step(net)
    cold = time.perf_counter() - t0
    med = interleaved(
        {"eager": lambda: step(model), "compiled": lambda: step(net)}, budget_s=repeats * 3.0, max_repeats=repeats
    )
    rows.append(
        {
            "case": f"{backbone} train step, batch 2 x {train_size}x{train_size}",
            "precision": "fp32",
            "eager_s": med["eager"],
            "compiled_s": med["compiled"],
            "cold_first_call_s": cold,
            "rel_diff": None,
        }
    )
    log(
        f"  compile {backbone} train step: eager {med['eager']:.3f} s, compiled {med['compiled']:.3f} s, "
        f"first call {cold:.1f} s"
    )
    return rows


def machine_load() -> dict:
    """The 1/5/15-minute load averages and the other processes' CPU use, as far as /proc tells."""
    try:
        one, five, fifteen = (float(v) for v in Path("/proc/loadavg").read_text().split()[:3])
    except (OSError, ValueError):
        return {}
    return {"loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen}


# ----------------------------------------------------------------------------- report


def run_benchmarks(
    out_dir: str | Path = "benchmarks",
    quick: bool = False,
    parts=("em", "model", "compile"),
    log=print,
    *,
    memory: bool = True,
    repeats: int = 5,
) -> dict:
    """Run the parts in order; the report is rewritten after each, so an interrupted run keeps what it
    measured. ``memory``: the per-case peak-memory subprocesses of (a); ``repeats``: of (b)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "results_quick" if quick else "results"
    # Flush denormals to zero, as CPU inference deployments do: the non-local block's near one-hot softmax
    # is full of denormals that otherwise slow its (N, N) GEMM about 8x here (measured), flattering EM.
    torch.set_flush_denormal(True)
    result: dict = {"machine": machine(), "quick": quick, "load_before": machine_load()}
    log(f"machine: {result['machine']}, load {result['load_before']}")
    result["matmul_gflops"] = {
        "float32": matmul_flops(torch.float32) / 1e9,
        "bfloat16": matmul_flops(torch.bfloat16) / 1e9,
    }
    log(f"matmul 2048^3: {result['matmul_gflops']}")
    started = time.perf_counter()

    def write(final: bool = False) -> None:
        # the closing float32 rate is measured once, at the end; a partial report repeats the opening one
        after = matmul_flops(torch.float32) / 1e9 if final else result["matmul_gflops"]["float32"]
        result["matmul_gflops_after"] = {"float32": after}
        result["load_after"] = machine_load()
        result["minutes"] = (time.perf_counter() - started) / 60
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (out / f"{stem}.md").write_text(format_report(result))

    if "em" in parts:
        log("(a) EM attention, C=512 K=64 T=3 B=1")
        sizes = (33, 65) if quick else SIZES
        result["em"] = bench_em(sizes, budget_s=0.5 if quick else 2.0, memory=memory and not quick, log=log)
        write()
    if "model" in parts:
        size = 129 if quick else 513
        log(f"(b) EMANet OS8 at {size}x{size}: eager forward, prepared forward, Predictor")
        result["model"] = bench_model(size=size, repeats=2 if quick else repeats, log=log)
        write()
    if "compile" in parts:
        if quick:
            log("(c) torch.compile: skipped with --quick (a cold compile alone takes longer than a quick run)")
        else:
            log("(c) torch.compile, EMANet-R50")
            result["compile"] = bench_compile(log=log)
    write(final=True)
    log((out / f"{stem}.md").read_text())
    return result


def _f32_rate(r: dict) -> float:
    """The conservative (higher) of the float32 matmul rates measured before and after: shares of it are
    lower bounds of efficiency on this shared machine."""
    return max(r["matmul_gflops"]["float32"], r["matmul_gflops_after"]["float32"])


MODEL_NOTE = [
    "Eager forward: `model(x)` on the normalised (1, 3, H, W) tensor, nothing else. Prepared forward: the same",
    "after `prepare_for_inference` (BN folded, channels_last). Predictor: the whole call on a uint8 image",
    "(preprocessing, forward, softmax, argmax, crop); default = prepared. Ratios are to the eager forward in the",
    "same precision, same run. Labels: share of pixels whose class equals the eager float32 forward's (a random",
    "network: bf16 rounding flips many near-ties).",
    "",
]


def _load_line(r: dict) -> str:
    before, after = r.get("load_before") or {}, r.get("load_after") or {}
    if not before:
        return "Machine load: not recorded."
    text = (
        f"Machine load (1/5/15-min load averages on {r['machine']['logical_cores']} cores): before "
        f"{before['loadavg_1m']:.2f}/{before['loadavg_5m']:.2f}/{before['loadavg_15m']:.2f}"
    )
    if after:
        text += f", after {after['loadavg_1m']:.2f}/{after['loadavg_5m']:.2f}/{after['loadavg_15m']:.2f}"
    if "minutes" in r:
        text += f"; the run took {r['minutes']:.1f} min"
    return text + ". Loads above ~2 mean other tenants were running: absolute times are then inflated."


def format_report(r: dict) -> str:
    m = r["machine"]
    f32, bf16 = _f32_rate(r), r["matmul_gflops"]["bfloat16"]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}, AMX-BF16: {m['amx_bf16']}, {m['date']}. Shared machine: medians of interleaved runs.",
        "",
        _load_line(r),
        "",
        f"Matmul 2048^3 in this run: float32 {f32:.1f} GFLOP/s, bfloat16 {bf16:.1f} GFLOP/s "
        f"(float32 again at the end: {r['matmul_gflops_after']['float32']:.1f}). Percentages and bounds use the "
        f"higher float32 figure ({f32:.1f}).",
    ]
    if "em" in r:
        lines += [
            "",
            "## (a) EM attention, C=512, K=64, T=3, B=1",
            "",
            "| size | variant | mode | median ms | GFLOP | GFLOP/s | % fp32 matmul | peak MB | ns/pixel |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
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
        size = r["model"][0]["size"]
        lines += ["", f"## (b) EMANet OS8 inference, one {size}x{size} image", ""] + MODEL_NOTE
        lines += [
            "| backbone | precision | variant | median s | x eager forward | GMACs | bound s | x bound | labels |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["model"]:
            rate = bf16 if row["precision"] == "bf16" else f32
            bound = 2 * row["gmacs"] / rate
            lines.append(
                f"| {row['backbone']} | {row['precision']} | {row['variant']} | {row['median_s']:.3f} | "
                f"{row['ratio_to_eager_forward']:.2f} | {row['gmacs']:.1f} | {bound:.3f} | "
                f"{row['median_s'] / bound:.2f}x | {row['label_agreement_vs_eager_fp32']:.4f} |"
            )
    if "compile" in r:
        lines += [
            "",
            "## (c) torch.compile (opt-in `--compile`), Inductor on this CPU",
            "",
            "| case | precision | eager s | compiled s | compiled / eager | first call (compile) s | rel. diff |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in r["compile"]:
            diff = f"{row['rel_diff']:.1e}" if row["rel_diff"] is not None else "-"
            lines.append(
                f"| {row['case']} | {row['precision']} | {row['eager_s']:.3f} | {row['compiled_s']:.3f} | "
                f"{row['compiled_s'] / row['eager_s']:.2f} | {row['cold_first_call_s']:.1f} | {diff} |"
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
        out.append(
            f"- never slower than the plain loop: plain/ours {', '.join(f'{x:.2f}' for x in ratios)} "
            f"-> {verdict(min(ratios) >= 1.0)}"
        )
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
        by = {(row["backbone"], row["precision"], row["variant"]): row for row in r["model"]}
        for backbone in sorted({row["backbone"] for row in r["model"]}):
            for p in ("fp32", "bf16"):
                row = by.get((backbone, p, "Predictor default (prepared)"))
                if row is None:
                    continue
                ratio = row["ratio_to_eager_forward"]
                target = f" -> {verdict(ratio <= 0.85)} (target <= 0.85)" if p == "fp32" else ""
                out.append(f"- {backbone} {p}: default Predictor / eager forward {ratio:.2f}{target}")
        fp32 = [row for row in r["model"] if row["precision"] == "fp32" and "forward" in row["variant"]]
        best = min(fp32, key=lambda row: row["median_s"] / row["gmacs"])
        ratio = best["median_s"] / (2 * best["gmacs"] / f32)
        out.append(
            f"- float32 inference within 1.5x of its matmul bound: best ({best['backbone']} "
            f"{best['variant']}) {ratio:.2f}x -> {verdict(ratio <= 1.5)}"
        )
    return out


if __name__ == "__main__":  # python -m emanet.benchmark [--quick] | --report results.json
    if "--report" in sys.argv:  # re-render results.md from a results.json
        src = Path(sys.argv[sys.argv.index("--report") + 1])
        (src.parent / "results.md").write_text(format_report(json.loads(src.read_text())))
    else:
        run_benchmarks(quick="--quick" in sys.argv)
