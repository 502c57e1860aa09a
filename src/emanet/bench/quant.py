"""int8 on the CPU: PyTorch (eager, prepared fp32 and bf16) vs onnxruntime (fp32, int8), and the rate each
reaches against the machine's measured peak. Writes benchmarks/int8_results.md and int8_results.json.

    emanet bench int8 [--threads N] [--repeats R] [--dry-run] [--out benchmarks]

Cases: EMANet-ResNet-50 and -ResNet-101 (reference layout: deep stem, OS8, 512 channels, K=64, T=3, 21
classes) at 1x3x513x513; random weights with BN statistics calibrated on one random batch (bench.onnx). The
int8 graph is ``deploy.quantize.quantize_int8``'s (EM unit in float32), calibrated on two random inputs of
the case's size (random weights: speed, not accuracy; docs/export.md has the accuracy runs). ``--dry-run``:
the tiny test model at 65x65, two repeats, to check the script end to end.

Variants, all on the same thread count, interleaved call by call (the order rotating each round), medians:
- eager fp32: the model as built, ``inference_mode``;
- prepared fp32 / bf16: ``models.fuse.prepare_for_inference`` (BN folded, conv+ReLU(+add) fused,
  channels_last), the default path of ``Predictor``; bf16 under the same autocast the Predictor uses;
- onnxruntime fp32 / int8: the exported graphs (all graph optimisations, no spinning; bench.onnx.session).

Rates: multiply-adds per second (``emanet.flops``: convs and EM products, as the paper counts), against the
peak measured here for that precision and runtime (the fastest call, before and after the cases): a 1x1
convolution of 1024 -> 1024 channels on 64x64 pixels (4.3 G multiply-adds), timed in PyTorch (oneDNN) fp32
and bf16 (channels_last) and in onnxruntime fp32 and int8 (a QDQ graph, which onnxruntime runs as an integer
convolution).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from emanet.bench.onnx import calibrated, interleaved_medians, lscpu, session
from emanet.bench.timing import machine
from emanet.checkpoint import write_text_atomic
from emanet.deploy.export import export_onnx, inference_copy
from emanet.deploy.quantize import CALIBRATION_IMAGES, quantize_file, quantize_int8
from emanet.errors import ConfigError
from emanet.flops import count_config
from emanet.metrics import ConfusionMatrix
from emanet.models.emanet import ModelConfig
from emanet.models.fuse import prepare_for_inference
from emanet.pretrained import LoadedModel
from emanet.runtime import autocast
from emanet.train.data import build_datasets

logger = logging.getLogger(__name__)

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
VARIANTS = ("eager fp32", "prepared fp32", "prepared bf16", "onnxruntime fp32", "onnxruntime int8")
PEAK_OF = {  # the peak each variant's rate is judged against
    "eager fp32": "torch fp32",
    "prepared fp32": "torch fp32",
    "prepared bf16": "torch bf16",
    "onnxruntime fp32": "onnxruntime fp32",
    "onnxruntime int8": "onnxruntime int8",
}
SIZE = 513
CPU = torch.device("cpu")


def cpu_flags() -> dict[str, bool]:
    """The ISA flags that decide int8 and bf16 speed, from /proc/cpuinfo."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return {f: False for f in FLAGS}
    present = set(line.split(":", 1)[1].split())
    return {f: f in present for f in FLAGS}


def _fastest_s(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls after a warm-up: a peak is what the machine can do, and on a shared
    machine a median measures the other jobs too."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rates(tmp: Path, threads: int, *, channels: int = 1024, side: int = 64, repeats: int = 20) -> dict:
    """Multiply-adds per second of one large 1x1 convolution in each runtime and precision."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 1).eval()
    x = torch.randn(1, channels, side, side)
    macs = channels * channels * side * side
    xl = x.contiguous(memory_format=torch.channels_last)
    conv_l = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    rates = {}
    with torch.inference_mode():
        rates["torch fp32"] = macs / _fastest_s(lambda: conv_l(xl), repeats)
        with autocast(CPU, "bf16"):
            rates["torch bf16"] = macs / _fastest_s(lambda: conv_l(xl), repeats)
    path = tmp / "conv.onnx"
    with torch.no_grad():
        torch.onnx.export(conv, (x,), str(path), dynamo=False, input_names=["image"], output_names=["logits"])
    quantize_file(path, tmp / "conv_int8.onnx", [x[0]])  # as quantize_int8 quantizes a model's convolutions
    xn = x.numpy()
    for name, file in (("onnxruntime fp32", path), ("onnxruntime int8", tmp / "conv_int8.onnx")):
        sess = session(file, threads)
        rates[name] = macs / _fastest_s(lambda s=sess: s.run(None, {"image": xn}), repeats)
    return {"conv": f"1x1, {channels}->{channels} channels, 1x{channels}x{side}x{side}", "macs": macs, "rates": rates}


def run_case(name: str, cfg: ModelConfig, side: int, repeats: int, threads: int, tmp: Path) -> dict:
    t_case = time.perf_counter()
    model = calibrated(cfg)
    prepared = prepare_for_inference(copy.deepcopy(model))  # the Predictor's default path
    macs = count_config(cfg, (side, side)).total.macs  # on the meta device: shapes only
    t0 = time.perf_counter()
    fp32_path = export_onnx(model, tmp / f"{name}.onnx", height=side, width=side, metadata={"bench": name})
    export_s = time.perf_counter() - t0
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(3, side, side, generator=generator) for _ in range(2)]
    t0 = time.perf_counter()
    int8_path = quantize_int8(
        model, tmp / f"{name}_int8.onnx", calibration, height=side, width=side, metadata={"bench": name}
    )
    quantize_s = time.perf_counter() - t0
    x = torch.randn(1, 3, side, side, generator=generator)
    xn, xl = x.numpy(), x.contiguous(memory_format=torch.channels_last)
    sessions = {"onnxruntime fp32": session(fp32_path, threads), "onnxruntime int8": session(int8_path, threads)}

    def torch_call(m, inp, precision="fp32"):
        def run():
            with torch.inference_mode(), autocast(CPU, precision):
                return m(inp).float()

        return run

    fns = {
        "eager fp32": torch_call(model, x),
        "prepared fp32": torch_call(prepared, xl),
        "prepared bf16": torch_call(prepared, xl, "bf16"),
        **{k: (lambda s=s: torch.from_numpy(s.run(["logits"], {"image": xn})[0])) for k, s in sessions.items()},
    }
    outputs = {k: fn().numpy() for k, fn in fns.items()}  # the first warm-up call; also the agreement
    ref = outputs["eager fp32"]
    med, fastest = interleaved_medians(fns, repeats, warmup=2)
    result = {
        "case": name,
        "input": [1, 3, side, side],
        "model": cfg.to_dict(),
        "macs_G": macs / 1e9,
        "int8_MiB": int8_path.stat().st_size / 2**20,
        "fp32_MiB": fp32_path.stat().st_size / 2**20,
        "export_s": export_s,
        "quantize_s": quantize_s,
        "repeats": repeats,
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "min_ms": {k: 1e3 * v for k, v in fastest.items()},
        "speedup_vs_prepared_fp32": {k: med["prepared fp32"] / v for k, v in med.items()},
        "gmacs_per_s": {k: macs / v / 1e9 for k, v in med.items()},
        "same_argmax_vs_eager": {k: float((v.argmax(1) == ref.argmax(1)).mean()) for k, v in outputs.items()},
        "case_s": time.perf_counter() - t_case,
    }
    speed = result["speedup_vs_prepared_fp32"]["onnxruntime int8"]
    logger.info(f"{name}: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in med.items()) + f" (int8 {speed:.2f}x)")
    return result


def cases(dry_run: bool) -> list[tuple[str, ModelConfig, int]]:
    if dry_run:  # the tiny test model (tests/conftest.py's TINY_MODEL)
        tiny = dict(backbone_width=8, stem="standard", num_classes=3, channels=16, mid_channels=8, num_bases=4)
        return [("tiny", ModelConfig(backbone="resnet18", **tiny), 65)]
    return [
        (f"emanet_{backbone}", ModelConfig(arch="emanet", backbone=backbone, num_classes=21), SIZE)
        for backbone in ("resnet50", "resnet101")
    ]


def run_int8_benchmark(out: Path, *, threads: int, repeats: int = 5, dry_run: bool = False) -> tuple[Path, dict]:
    """Measure the peaks and the cases; write ``out``/int8_results(_dry_run).md and .json."""
    import onnxruntime

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="emanet-bench-int8-") as tmp:
        small = {"channels": 64, "side": 16, "repeats": 2} if dry_run else {}
        peak = peak_rates(Path(tmp), threads, **small)
        repeats = 2 if dry_run else repeats
        results = [run_case(*case, repeats=repeats, threads=threads, tmp=Path(tmp)) for case in cases(dry_run)]
        after = peak_rates(Path(tmp), threads, **small)  # and again: the faster of the two is the peak
        peak["rates"] = {k: max(v, after["rates"][k]) for k, v in peak["rates"].items()}
    for r in results:
        r["of_peak"] = {k: 1e9 * r["gmacs_per_s"][k] / peak["rates"][PEAK_OF[k]] for k in r["gmacs_per_s"]}
    data = {
        "machine": machine(),
        "flags": cpu_flags(),
        "lscpu": lscpu(),
        "threads": threads,
        "onnxruntime": onnxruntime.__version__,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "wall_s": time.perf_counter() - t_start,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "peak": peak,
        "cases": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("int8_results_dry_run" if dry_run else "int8_results")
    write_text_atomic(stem.with_suffix(".json"), json.dumps(data, indent=2))
    write_text_atomic(stem.with_suffix(".md"), render(data))
    return stem, data


def render(data: dict) -> str:
    m, flags = data["machine"], data["flags"]
    present = ", ".join(f for f, ok in flags.items() if ok) or "none of " + ", ".join(FLAGS)
    lines = [
        "# int8 on the CPU: PyTorch vs onnxruntime",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores ({data['lscpu']}); ISA flags: {present}. "
        f"{data['threads']} threads for every variant. **Shared** machine: 1-minute load average "
        f"{data['load_before'][0]:.1f} before, {data['load_after'][0]:.1f} after; ratios come from interleaved "
        f"calls in one run. torch {m['torch']}, onnxruntime {data['onnxruntime']}, {m['date']}. "
        f"Command: `emanet bench int8 --threads {data['threads']}` ({data['wall_s']:.0f} s).",
        "",
        "| case | variant | median ms | min ms | speed vs prepared fp32 | G multiply-adds/s | of that "
        "precision's peak | same argmax as eager fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["cases"]:
        for k, v in r["median_ms"].items():
            lines.append(
                f"| {r['case']} ({r['macs_G']:.0f} G MACs) | {k} | {v:.0f} | {r['min_ms'][k]:.0f} | "
                f"{r['speedup_vs_prepared_fp32'][k]:.2f}x | {r['gmacs_per_s'][k]:.1f} | "
                f"{100 * r['of_peak'][k]:.0f}% | {100 * r['same_argmax_vs_eager'][k]:.3f}% |"
            )
    p = data["peak"]
    lines += [
        "",
        f"Peaks ({p['conv']}, {p['macs'] / 1e9:.2f} G multiply-adds; the fastest of 20 calls, measured before "
        "and after the cases): " + ", ".join(f"{k} {v / 1e9:.1f} G/s" for k, v in p["rates"].items()) + ".",
        "",
        "| case | fp32 ONNX | int8 ONNX | export | quantize (incl. export, calibration on 2 inputs) | repeats |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["cases"]:
        lines.append(
            f"| {r['case']} | {r['fp32_MiB']:.1f} MiB | {r['int8_MiB']:.1f} MiB | {r['export_s']:.0f} s | "
            f"{r['quantize_s']:.0f} s | {r['repeats']} |"
        )
    lines += [
        "",
        "Random weights (BN calibrated on one random batch), calibration on random inputs: the argmax column "
        "shows the variants run the same network, not int8's accuracy (docs/export.md).",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- accuracy of a trained model


def int8_accuracy(loaded: LoadedModel, *, calibration_images: int = CALIBRATION_IMAGES, threads: int) -> dict:
    """int8 vs float32 on ``loaded``'s validation split (the config's dataset, read as `emanet eval` reads
    it): calibrate on ``calibration_images`` of it (a fixed shuffled order, as `emanet export` draws them),
    then on every other image the mIoU of float32 PyTorch and of the int8 graph (onnxruntime), and the share
    of pixels whose label they agree on. Whole-image inference at scale 1, no flip."""
    _, val = build_datasets(loaded.config)
    if len(val) <= calibration_images:
        raise ConfigError(
            f"the validation split has {len(val)} images; calibrating on {calibration_images} leaves none"
        )
    order = [int(i) for i in np.random.default_rng(0).permutation(len(val))]
    side = loaded.config.data.crop_size
    net = inference_copy(loaded.model)
    n = loaded.config.model.num_classes
    ignore = loaded.config.loss.ignore_index
    fp32, int8 = ConfusionMatrix(n, ignore), ConfusionMatrix(n, ignore)
    same = pixels = 0
    with tempfile.TemporaryDirectory(prefix="emanet-int8-acc-") as tmp:
        calibration = [val[i][0] for i in order[:calibration_images]]
        path = quantize_int8(loaded, Path(tmp) / "int8.onnx", calibration, height=side, width=side)
        sess = session(path, threads)
        for i in order[calibration_images:]:
            x, mask = val[i]
            with torch.inference_mode():
                a = net(x[None]).argmax(1)
            b = torch.from_numpy(sess.run(["logits"], {"image": x[None].numpy()})[0]).argmax(1)
            fp32.update(a, mask[None])
            int8.update(b, mask[None])
            same += int((a == b).sum())
            pixels += a.numel()
    return {
        "source": str(loaded.source),
        "calibration_images": calibration_images,
        "eval_images": len(order) - calibration_images,
        "mIoU_fp32": fp32.compute()["mIoU"],
        "mIoU_int8": int8.compute()["mIoU"],
        "label_agreement": same / pixels,
    }
