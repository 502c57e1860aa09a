"""`emanet bench`: the CPU speed suite; `emanet bench gpu`, `emanet bench onnx` and `emanet bench int8` run the
others.

The measuring code lives in emanet.bench (cpu.py, gpu.py, onnx.py, quant.py); here are their flags. Progress goes to
the log (stderr), the finished table and the files written to stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from emanet.bench.cpu import PARTS, run_benchmarks
from emanet.bench.gpu import run_gpu_benchmark
from emanet.bench.onnx import run_onnx_benchmark
from emanet.bench.quant import int8_accuracy, run_int8_benchmark
from emanet.bench.report import format_report
from emanet.checkpoint import claim_folder, write_text_atomic
from emanet.deploy.export import require_onnx
from emanet.deploy.hub import resolve_source
from emanet.deploy.quantize import CALIBRATION_IMAGES
from emanet.errors import ConfigError, install_hint
from emanet.experiments.demo import demo_config
from emanet.pretrained import load_model

EXAMPLE = """examples:
  emanet bench --quick                   a smoke run of the CPU suite
  emanet bench --parts em --out bench/   one part of the CPU suite
  emanet bench gpu                       the CUDA suite (within ~6 minutes)
  emanet bench onnx --quick              eager PyTorch vs onnxruntime
  emanet bench int8 --threads 2          PyTorch fp32/bf16 vs onnxruntime fp32/int8 at 513x513
  emanet bench int8 --accuracy runs/toy  int8 vs float32 mIoU of a trained model"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed benchmarks of the EM attention and the whole model")
    p.add_argument("--out", default="benchmarks", help="folder for results.md / results.json (default: benchmarks)")
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="what to run (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
    p.add_argument(
        "--report", metavar="JSON", help="re-render the .md beside a results .json (measures nothing: no other flag)"
    )
    p.set_defaults(func=run_cpu)
    suites = p.add_subparsers(dest="suite", help="another suite instead of the CPU one")
    gpu = suites.add_parser("gpu", help="training, inference and EM attention on one CUDA GPU (within ~6 minutes)")
    gpu.add_argument("--out", default="benchmarks", help="folder for gpu_results.* (default: benchmarks)")
    gpu.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the script end to end")
    gpu.add_argument("--budget-s", type=float, default=330.0, help="seconds of measuring before skipping")
    gpu.set_defaults(func=run_gpu)
    onnx = suites.add_parser("onnx", help=f"eager PyTorch vs onnxruntime on the CPU ({install_hint('onnx')})")
    onnx.add_argument("--out", default="benchmarks", help="folder for the results (default: benchmarks)")
    onnx.add_argument("--quick", action="store_true", help="the demo model only, few repeats (a smoke run)")
    onnx.add_argument("--threads", type=int, help="threads for both runtimes (default: torch's)")
    onnx.set_defaults(func=run_onnx)
    int8 = suites.add_parser(
        "int8",
        help="EMANet-R50/R101 at 513x513: PyTorch eager/prepared fp32/bf16 vs onnxruntime fp32/int8, against the "
        f"measured peak ({install_hint('onnx')})",
    )
    int8.add_argument("--out", default="benchmarks", help="folder for int8_results.* (default: benchmarks)")
    int8.add_argument("--threads", type=int, help="threads for every variant (default: torch's)")
    int8.add_argument("--repeats", type=int, default=5, help="timed calls per variant after warm-up (default: 5)")
    int8.add_argument("--dry-run", action="store_true", help="the tiny test model at 65x65: check the script")
    int8.add_argument(
        "--accuracy",
        metavar="SOURCE",
        help="instead of speed: int8 vs float32 mIoU and label agreement of a trained model (folder, checkpoint or "
        "run) on its config's validation split; writes int8_accuracy.json",
    )
    int8.add_argument(
        "--calibration-images",
        type=int,
        default=CALIBRATION_IMAGES,
        help=f"--accuracy: validation images to calibrate on, the rest are evaluated (default: {CALIBRATION_IMAGES})",
    )
    int8.set_defaults(func=run_int8)


def run_cpu(args: argparse.Namespace) -> int:
    if args.report:
        src = Path(args.report)
        out = src.with_suffix(".md")  # the table beside its JSON, rewritten by design (never a run's file)
        write_text_atomic(out, format_report(json.loads(src.read_text())))
        print(f"written: {out}")
        return 0
    claim_folder(args.out)  # made and proven writable before minutes of measuring
    md = run_benchmarks(out_dir=args.out, quick=args.quick, parts=args.parts)
    print(md.read_text())
    print(f"written: {md}, {md.with_suffix('.json')}")
    return 0


def run_gpu(args: argparse.Namespace) -> int:
    claim_folder(args.out)
    result = run_gpu_benchmark(Path(args.out), dry_run=args.dry_run, budget_s=args.budget_s)
    print(f"written: {Path(args.out) / 'gpu_results.md'} ({result['seconds']:.0f} s)")
    return 0


def run_onnx(args: argparse.Namespace) -> int:
    require_onnx("onnx", "onnxruntime")  # OnnxNotInstalled is a user error
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    claim_folder(args.out)
    stem, wall_s = run_onnx_benchmark(Path(args.out), demo=demo_config(), quick=args.quick, threads=threads)
    print(f"written: {stem}.md/.json ({wall_s:.0f} s)")
    return 0


def run_int8(args: argparse.Namespace) -> int:
    require_onnx("onnx", "onnxruntime")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    claim_folder(args.out)
    if args.accuracy:
        result = int8_accuracy(
            load_model(resolve_source(args.accuracy)), calibration_images=args.calibration_images, threads=threads
        )
        out = Path(args.out) / "int8_accuracy.json"
        write_text_atomic(out, json.dumps(result, indent=2))
        print(
            f"mIoU float32 {100 * result['mIoU_fp32']:.2f}, int8 {100 * result['mIoU_int8']:.2f}; same label on "
            f"{100 * result['label_agreement']:.3f}% of pixels ({result['eval_images']} images, calibrated on "
            f"{result['calibration_images']} others)\nwritten: {out}"
        )
        return 0
    stem, data = run_int8_benchmark(Path(args.out), threads=threads, repeats=args.repeats, dry_run=args.dry_run)
    print(stem.with_suffix(".md").read_text())
    print(f"written: {stem}.md/.json ({data['wall_s']:.0f} s)")
    return 0
