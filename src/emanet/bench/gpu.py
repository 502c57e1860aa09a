"""GPU benchmark of EMANet: training throughput and memory, whole-image inference latency, EM attention.

    emanet bench gpu                      # one CUDA GPU; writes benchmarks/gpu_results.md and .json
    emanet bench gpu --dry-run --out DIR  # CPU, tiny shapes: checks the code end to end (the tests)

Sized to finish within 6 minutes on one H100/H200 (``--budget-s``, default 330 s of measuring): the cases run
in priority order and any left when the budget is spent are listed as skipped, never silently dropped.

(a) Training, EMANet-R50-D8 and -R101-D8 (deep stem, OS8, 19 classes, Cityscapes 512x1024 crops), batch 2
    and 8: images/s (median step time; forward, loss, backward, SGD step) and peak allocated memory, in fp32,
    bf16 and fp16 AMP (with a grad scaler), NCHW and channels_last, eager and torch.compile. Compile runs
    only on the channels_last AMP cases (its cold start costs about a minute each); host syncs inside a
    step are counted with torch.cuda's sync debug mode.
(b) Whole-image inference at 1024x2048, batch 1: eager fp32, and the prepared model (BN folded,
    channels_last; what Predictor uses) in fp32, bf16 and fp16, next to mmsegmentation's published V100
    figures for the same models (fp32; another GPU, so context, not a comparison of implementations).
(c) EM attention at 65^2, 97^2 and 129^2 (C=512, K=64, T=3), batch 1 and 8: em_attention vs an einsum
    transcription vs the non-local block, achieved FLOP/s as a share of this GPU's measured matmul rate
    (float32 without TF32, and bfloat16).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from emanet.bench.gpu_report import format_report
from emanet.bench.timing import Clock, count_flops, count_host_syncs, peak_memory, reset_memory
from emanet.checkpoint import write_text_atomic
from emanet.errors import UserError
from emanet.losses import SegmentationLoss
from emanet.models.em import em_attention
from emanet.models.emanet import ModelConfig, build_model
from emanet.models.fuse import prepare_for_inference
from emanet.models.heads import NonLocal2d

logger = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# mmsegmentation's EMANet Cityscapes table (V100, fp32, ms per image at 1024x2048, whole-image test)
MMSEG_V100_MS = {
    ("resnet50", "512x1024"): 218.0,
    ("resnet101", "512x1024"): 348.0,
    ("resnet50", "769x769"): 508.0,
    ("resnet101", "769x769"): 820.0,
}


@dataclass
class Shapes:
    """Everything the dry run shrinks."""

    crop: tuple[int, int] = (512, 1024)
    batches: tuple[int, ...] = (2, 8)
    image: tuple[int, int] = (1024, 2048)
    em_sizes: tuple[int, ...] = (65, 97, 129)
    em_batches: tuple[int, ...] = (1, 8)
    channels: int = 512
    num_bases: int = 64
    warmup: int = 3
    steps: int = 10
    train_warmup: int = 2  # after the first step (timed apart: it compiles when compiled)
    train_steps: int = 5
    matmul_n: int = 8192
    model: dict | None = None  # extra ModelConfig fields (the dry run's tiny widths)
    backbones: tuple[str, ...] = ("resnet50", "resnet101")
    compile_backbones: tuple[str, ...] = ("resnet50", "resnet101")
    compile_precisions: tuple[str, ...] = ("bf16", "fp16")
    compile_s: float = 90.0  # what a compiled case may take (cold compile + steps): not started with less left


GPU = Shapes()
DRY = Shapes(  # every code path once, in seconds: one tiny ResNet-18 stands in for both models
    crop=(17, 33),
    batches=(2,),
    image=(17, 33),
    em_sizes=(5,),
    em_batches=(1, 2),
    channels=16,
    num_bases=4,
    warmup=0,
    steps=1,
    train_warmup=0,
    train_steps=1,
    matmul_n=64,
    model=dict(backbone_width=8, channels=16, mid_channels=8, num_bases=4, multi_grid=False),
    backbones=("resnet18",),
    compile_backbones=("resnet18",),
    compile_precisions=("bf16",),
    compile_s=0.0,
)


def machine(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            sm=f"{props.major}.{props.minor}",
        )
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = "unknown"
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def matmul_rates(device: torch.device, n: int, clock: Clock) -> dict:
    """Measured dense matmul TFLOP/s: float32 with TF32 off (what em_attention's float32 GEMMs get) and bf16."""
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        rates[name] = 2 * n**3 / clock.median(lambda a=a, b=b: a @ b, 3, 10) / 1e12
    return rates


# ----------------------------------------------------------------------------- (a) training


def _model(backbone: str, shapes: Shapes) -> nn.Module:
    return build_model(ModelConfig(backbone=backbone, num_classes=19, **(shapes.model or {})))


def train_case(
    backbone: str,
    batch: int,
    precision: str,
    channels_last: bool,
    compiled: bool,
    *,
    device: torch.device,
    shapes: Shapes,
    clock: Clock,
    compile_backend: str,
) -> dict:
    torch.manual_seed(0)
    reset_memory(device)
    model = _model(backbone, shapes).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model, backend=compile_backend) if compiled else model
    criterion = SegmentationLoss(reduction="all")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    images = torch.randn(batch, 3, *shapes.crop, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 19, (batch, *shapes.crop), device=device)
    amp = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")

    def step() -> None:
        with amp:
            loss = criterion(net(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    clock.sync()
    t0 = time.perf_counter()
    step()  # the first step: compiles when compiled
    clock.sync()
    first = time.perf_counter() - t0
    median = clock.median(step, shapes.train_warmup, shapes.train_steps)
    return {
        "backbone": backbone,
        "batch": batch,
        "precision": precision,
        "channels_last": channels_last,
        "compiled": compiled,
        "images_per_s": batch / median,
        "step_s": median,
        "first_step_s": first,
        "peak_gib": peak_memory(device),
        "host_syncs_per_step": count_host_syncs(device, step),
    }


def train_cases(shapes: Shapes) -> list[dict]:
    """Priority order, so a spent budget cuts the least informative cases: the channels_last eager grid
    (both models, both batches, all precisions), compile with bf16, the NCHW eager grid, compile with fp16."""

    def eager(channels_last: bool) -> list[dict]:
        return [
            dict(backbone=b, batch=n, precision=p, channels_last=channels_last, compiled=False)
            for b in shapes.backbones
            for n in shapes.batches
            for p in DTYPES
        ]

    def compiled(precision: str) -> list[dict]:
        if precision not in shapes.compile_precisions:
            return []
        batch = max(shapes.batches)
        return [
            dict(backbone=b, batch=batch, precision=precision, channels_last=True, compiled=True)
            for b in shapes.compile_backbones
        ]

    return eager(True) + compiled("bf16") + eager(False) + compiled("fp16")


# ----------------------------------------------------------------------------- (b) inference


def inference_cases(device: torch.device, shapes: Shapes, clock: Clock, budget: Budget) -> list[dict]:
    rows = []
    x = torch.randn(1, 3, *shapes.image, device=device)
    for backbone in shapes.backbones:
        torch.manual_seed(0)
        eager = _model(backbone, shapes).to(device).eval()
        fast = prepare_for_inference(copy.deepcopy(eager))  # the same weights, BN folded, channels_last
        variants = [("eager", "fp32", eager)] + [("prepared", p, fast) for p in ("fp32", "bf16", "fp16")]
        for kind, precision, model in variants:
            if budget.spent():
                rows.append({"backbone": backbone, "variant": kind, "precision": precision, "skipped": "budget"})
                continue
            amp = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")

            def run(model=model, amp=amp) -> None:
                with torch.inference_mode(), amp:
                    model(x)

            reset_memory(device)
            t = clock.median(run, shapes.warmup, shapes.steps)
            rows.append(
                {
                    "backbone": backbone,
                    "variant": kind,
                    "precision": precision,
                    "ms": 1e3 * t,
                    "peak_gib": peak_memory(device),
                    "mmseg_v100_ms_512x1024": MMSEG_V100_MS.get((backbone, "512x1024")),
                    "mmseg_v100_ms_769x769": MMSEG_V100_MS.get((backbone, "769x769")),
                }
            )
            budget.log(f"inference {backbone} {kind} {precision}: {1e3 * t:.1f} ms")
    return rows


# ----------------------------------------------------------------------------- (c) EM attention


def einsum_em(x: torch.Tensor, bases: torch.Tensor, stages: int, eps: float = 1e-6) -> torch.Tensor:
    """The EM iterations as einsums over (B, C, N), the way many ports write them."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h * w).float()
    mu = bases.float().expand(b, -1, -1)
    for _ in range(stages):
        z = torch.softmax(torch.einsum("bcn,bck->bnk", x, mu), dim=2)
        z_ = z / (eps + z.sum(dim=1, keepdim=True))
        mu = torch.einsum("bcn,bnk->bck", x, z_)
        mu = mu / (eps + mu.norm(dim=1, keepdim=True))
    return torch.einsum("bck,bnk->bcn", mu, z).view(b, c, h, w)


def em_cases(device: torch.device, shapes: Shapes, clock: Clock, rates: dict, budget: Budget) -> list[dict]:
    rows = []
    c, k = shapes.channels, shapes.num_bases
    nonlocal_block = NonLocal2d(c).to(device).eval()
    for size in shapes.em_sizes:
        for batch in shapes.em_batches:
            torch.manual_seed(0)
            x = torch.relu(torch.randn(batch, c, size, size, device=device))
            bases = nn.functional.normalize(torch.randn(1, c, k, device=device), dim=1)
            variants = {
                ("em_attention", "fp32"): lambda x=x, bases=bases: em_attention(x, bases, 3),
                ("einsum", "fp32"): lambda x=x, bases=bases: einsum_em(x, bases, 3),
                ("nonlocal", "fp32"): lambda x=x: nonlocal_block(x),
                ("nonlocal", "bf16"): lambda x=x: _autocast(device, nonlocal_block, x),
            }
            for (variant, precision), fn in variants.items():
                if budget.spent():
                    rows.append(
                        {"size": size, "batch": batch, "variant": variant, "precision": precision, "skipped": "budget"}
                    )
                    continue
                with torch.inference_mode():
                    flops = count_flops(fn)
                    t = clock.median(fn, shapes.warmup, shapes.steps)
                rate = flops / t / 1e12
                rows.append(
                    {
                        "size": size,
                        "batch": batch,
                        "variant": variant,
                        "precision": precision,
                        "ms": 1e3 * t,
                        "gflop": flops / 1e9,
                        "tflops": rate,
                        "pct_of_matmul": 100 * rate / rates[precision],
                    }
                )
                budget.log(f"EM {size}^2 B={batch} {variant} {precision}: {1e3 * t:.3f} ms, {rate:.2f} TFLOP/s")
    return rows


def _autocast(device: torch.device, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return module(x)


# ----------------------------------------------------------------------------- driver


class Budget:
    """Seconds of measuring left; its log lines say how far into the budget they were written."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def spent(self, need: float = 0.0) -> bool:
        """True when less than ``need`` seconds of the budget are left (``need`` = 0: none left)."""
        return self.elapsed() + need > self.seconds

    def log(self, message: str) -> None:
        logger.info(f"[{self.elapsed():6.1f} s] {message}")


def run_gpu_benchmark(out: Path, *, dry_run: bool, budget_s: float) -> dict:
    """Measure (c), (b) then (a) within ``budget_s`` seconds; write gpu_results.json and .md into ``out``."""
    if dry_run:
        device, shapes, backend = torch.device("cpu"), DRY, "eager"  # compile path traced, no code generation
        torch.set_num_threads(1)  # tiny ops: a thread pool costs more than it saves
    else:
        if not torch.cuda.is_available():
            raise UserError("emanet bench gpu needs a CUDA GPU (or --dry-run for the CPU check)")
        device, shapes, backend = torch.device("cuda"), GPU, "inductor"
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (the EM's GEMMs)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
    budget = Budget(budget_s)
    clock = Clock(device)
    result: dict = {
        "dry_run": dry_run,
        "machine": machine(device),
        "budget_s": budget_s,
        "shapes": {
            "crop": shapes.crop,
            "image": shapes.image,
            "em_sizes": shapes.em_sizes,
            "channels": shapes.channels,
            "num_bases": shapes.num_bases,
        },
    }
    result["matmul_tflops"] = matmul_rates(device, shapes.matmul_n, clock)
    budget.log(f"matmul TFLOP/s: {result['matmul_tflops']}")
    # (c) and (b) first: short and cheap; then the training grid, whose tail (compile) the budget may cut
    result["em"] = em_cases(device, shapes, clock, result["matmul_tflops"], budget)
    result["inference"] = inference_cases(device, shapes, clock, budget)
    result["train"] = []
    for case in train_cases(shapes):
        if budget.spent(need=shapes.compile_s if case["compiled"] else 0.0):
            result["train"].append({**case, "skipped": "budget"})
            continue
        try:
            row = train_case(**case, device=device, shapes=shapes, clock=clock, compile_backend=backend)
        except torch.cuda.OutOfMemoryError:
            row = {**case, "skipped": "out of memory"}
        result["train"].append(row)
        if "skipped" not in row:
            budget.log(f"train {case}: {row['images_per_s']:.2f} img/s, peak {row['peak_gib']} GiB")
        reset_memory(device)
    result["seconds"] = budget.elapsed()
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "gpu_results.json", json.dumps(result, indent=2))
    write_text_atomic(out / "gpu_results.md", format_report(result))
    return result
