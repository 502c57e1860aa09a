"""Eager PyTorch vs onnxruntime on CPU: writes benchmarks/onnx_results.md and onnx_results.json.

    emanet bench onnx [--quick] [--out benchmarks]

Cases: the demo model (`emanet demo`'s config, which the command passes in) at its crop size, and
EMANet-ResNet-50 (reference layout: deep stem, OS8, 512 channels, K=64, T=3, 21 classes) at 512x512; batch 1,
random weights with BN statistics calibrated on one random batch (so activations have a trained network's scale).
Variants: eager float32 (inference_mode), eager with BatchNorm folded into the convs (models/fuse.py), and
onnxruntime's CPUExecutionProvider on the model exported by emanet.deploy.export (torchscript exporter, opset 17,
all graph optimisations). All use the same thread count. Variants take turns call by call (the order rotates
each round), after warm-up calls, so load from other jobs on the shared machine hits them alike; the table
gives medians and ratios of medians against eager float32.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from emanet.bench.timing import machine
from emanet.checkpoint import write_text_atomic
from emanet.config import Config
from emanet.deploy.export import export_onnx
from emanet.models.emanet import ModelConfig, build_model
from emanet.models.fuse import prepare_for_inference

logger = logging.getLogger(__name__)


def calibrated(cfg: ModelConfig, size: int = 65) -> nn.Module:
    """Random weights; BN running stats set to the statistics of one random batch (momentum=None = exact)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # cumulative average: after one batch, the running stats ARE the batch stats
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
    for bn in bns:
        bn.momentum = cfg.bn_momentum
    return model.eval()


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle worker threads would otherwise spin and take CPU from the eager call that runs next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.set_denormal_as_zero", "1")  # as torch.set_flush_denormal below
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_medians(fns: dict, repeats: int, warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median and fastest seconds per call, the variants taking turns (who goes first rotates each round);
    ``warmup`` - 1 more rounds first (the caller's parity call was the first)."""
    for _ in range(warmup - 1):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, {k: min(v) for k, v in times.items()}


def _parity(outputs: dict[str, np.ndarray], model: nn.Module, x: torch.Tensor) -> dict:
    """Each variant's logits against eager float32, and against a float64 run of the same model."""
    ref = outputs["eager fp32"]
    with torch.inference_mode():  # float32 rounding of each variant, against a float64 run of the same model
        exact = copy.deepcopy(model).double()(x.double()).numpy()
    return {
        "max_abs_diff_vs_eager": {k: float(np.abs(v - ref).max()) for k, v in outputs.items() if k != "eager fp32"},
        "max_abs_diff_vs_float64": {k: float(np.abs(v - exact).max()) for k, v in outputs.items()},
        "same_argmax_vs_eager": {
            k: float((v.argmax(1) == ref.argmax(1)).mean()) for k, v in outputs.items() if k != "eager fp32"
        },
        "max_abs_logit": float(np.abs(ref).max()),
    }


def run_case(
    name: str, cfg: ModelConfig, shape: tuple[int, ...], repeats: int, warmup: int, threads: int, tmp: Path
) -> dict:
    t_case = time.perf_counter()
    torch.set_num_threads(threads)
    model = calibrated(cfg)
    folded = prepare_for_inference(calibrated(cfg), channels_last=False, fold_bn=True)
    t0 = time.perf_counter()
    path = export_onnx(model, tmp / f"{name}_{threads}.onnx", height=shape[2], width=shape[3])
    export_s = time.perf_counter() - t0
    sess = session(path, threads)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    xn = x.numpy()

    def eager(m):
        def run():
            with torch.inference_mode():
                return m(x)

        return run

    fns = {
        "eager fp32": eager(model),
        "eager BN-folded": eager(folded),
        "onnxruntime": lambda: sess.run(["logits"], {"image": xn})[0],
    }
    outputs = {k: np.asarray(fn()) for k, fn in fns.items()}  # first warm-up call; also the parity figures
    parity = _parity(outputs, model, x)
    med, fastest = interleaved_medians(fns, repeats, warmup)
    result = {
        "case": name,
        "threads": threads,
        "input": list(shape),
        "model": cfg.to_dict(),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "onnx_MiB": path.stat().st_size / 2**20,
        "export_s": export_s,
        "repeats": repeats,
        "warmup": warmup,
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "min_ms": {k: 1e3 * v for k, v in fastest.items()},
        "ratio_vs_eager": {k: med[k] / med["eager fp32"] for k in fns},
        **parity,
        "case_s": time.perf_counter() - t_case,
    }
    times_ms = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in med.items())
    ratio = result["ratio_vs_eager"]["onnxruntime"]
    logger.info(f"{name} ({threads} thr.): {times_ms} (onnxruntime/eager {ratio:.2f}x)")
    return result


def lscpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    keep = (
        "Model name",
        "CPU(s):",
        "Thread(s) per core",
        "Core(s) per socket",
        "L2 cache",
        "L3 cache",
        "Hypervisor vendor",
    )
    return "; ".join(" ".join(line.split()) for line in out.splitlines() if line.startswith(keep))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3f}%"


def render(data: dict) -> str:
    m = data["machine"]
    lines = [
        "# Eager PyTorch vs onnxruntime (CPU)",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores ({data['lscpu']}). **Shared** with other "
        f"developers' jobs, which can run at the same time (1-minute load average {data['load_before'][0]:.1f} "
        f"before, {data['load_after'][0]:.1f} after), so absolute times are noisy; ratios come from interleaved "
        f"calls in the same run. torch {m['torch']}, onnxruntime {data['onnxruntime']}, Python {m['python']}, "
        f"the same thread count for both (onnxruntime intra-op, no spinning), denormals flushed in both, "
        f"{m['date']}. Command: `emanet bench onnx` ({data['wall_s']:.0f} s).",
        "",
        "| case | input | threads | variant | median ms | min ms | vs eager fp32 | max abs diff: vs eager fp32 "
        "| vs float64 | same argmax as eager fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["cases"]:
        shape = "x".join(str(s) for s in r["input"])
        for k, v in r["median_ms"].items():
            diff, same = r["max_abs_diff_vs_eager"].get(k), r["same_argmax_vs_eager"].get(k)
            lines.append(
                f"| {r['case']} | {shape} | {r['threads']} | {k} | {v:.1f} | {r['min_ms'][k]:.1f} | "
                f"{r['ratio_vs_eager'][k]:.2f}x | {'-' if diff is None else f'{diff:.1e}'} | "
                f"{r['max_abs_diff_vs_float64'][k]:.1e} | {_pct(same)} |"
            )
    lines += [
        "",
        "| case | params | ONNX file | export time | repeats (after warm-up) | max abs logit | case time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["cases"]:
        lines.append(
            f"| {r['case']} ({r['threads']} thr.) | {r['params_M']:.2f} M | {r['onnx_MiB']:.1f} MiB | "
            f"{r['export_s']:.1f} s | {r['repeats']} ({r['warmup']}) | {r['max_abs_logit']:.1f} | "
            f"{r['case_s']:.0f} s |"
        )
    lines += [
        "",
        "Ratios below 1 are faster than eager float32. Random weights (BN calibrated on one random batch): the "
        "differences measure float32 rounding through the network, not accuracy; 'vs float64' compares each "
        "variant with the same model run in float64, so onnxruntime and eager float32 can be judged alike.",
        "",
    ]
    return "\n".join(lines)


def run_onnx_benchmark(out: Path, *, demo: Config, quick: bool, threads: int) -> tuple[Path, float]:
    """Run the cases and write ``out``/onnx_results(_quick).md and .json; returns their common stem
    (without suffix) and the seconds taken. ``demo``: the demo's config, whose model is the first case."""
    import onnxruntime

    torch.set_flush_denormal(True)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    demo_model, side = demo.model, demo.data.crop_size
    # (name, model, input, repeats, warm-up calls, threads); the demo also on one thread, where a busy
    # machine cannot stall a parallel region waiting for a second core
    cases = [("demo", demo_model, (1, 3, side, side), 10 if quick else 30, 3, threads)]
    if not quick:
        cases.append(("demo", demo_model, (1, 3, side, side), 30, 3, 1))
        r50 = ModelConfig(arch="emanet", backbone="resnet50", num_classes=21)
        cases.append(("emanet_resnet50", r50, (1, 3, 512, 512), 5, 1, threads))
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_case(*case, tmp=Path(tmp)) for case in cases]
    data = {
        "machine": machine(),
        "lscpu": lscpu(),
        "onnxruntime": onnxruntime.__version__,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "wall_s": time.perf_counter() - t_start,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "cases": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("onnx_results_quick" if quick else "onnx_results")
    write_text_atomic(stem.with_suffix(".json"), json.dumps(data, indent=2))
    write_text_atomic(stem.with_suffix(".md"), render(data))
    return stem, data["wall_s"]
