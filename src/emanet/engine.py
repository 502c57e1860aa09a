"""Training and evaluation loops for any model that returns logits.

`train(cfg)` reads top to bottom: set-up -> resume -> for each step: micro-batches (autocast forward,
loss, backward) -> EMA bases update over the accumulated batch -> optimizer step -> LR schedule -> log ->
checkpoint -> evaluate.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from emanet.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from emanet.config import Config, save_config
from emanet.data import build_dataset
from emanet.data.base import worker_init_fn
from emanet.data.transforms import eval_transform, train_transform
from emanet.em import ema_units, set_eval_stages
from emanet.inference import infer
from emanet.losses import SegmentationLoss
from emanet.metrics import ConfusionMatrix
from emanet.models.emanet import build_model

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- set-up helpers


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for convs and matmuls; EM attention keeps its iterations in float32 itself."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def param_groups(model: nn.Module, lr: float, weight_decay: float, reference: bool) -> list[dict[str, Any]]:
    """The reference's groups: weight decay on conv/linear weights only; biases at 2x LR, no decay;
    norm weights no decay. Each group carries `lr_mult` for the schedule."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not reference:
        return [{"params": [p for _, p in params], "lr": lr, "weight_decay": weight_decay, "lr_mult": 1.0}]
    decay, no_decay, biases = [], [], []
    for name, p in params:
        if name.endswith("bias"):
            biases.append(p)
        elif p.ndim <= 1:  # norm weights, EMA gamma
            no_decay.append(p)
        else:  # conv weights (and learned bases, (1, C, K))
            decay.append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "lr_mult": 1.0},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "lr_mult": 1.0},
        {"params": biases, "lr": 2 * lr, "weight_decay": 0.0, "lr_mult": 2.0},
    ]
    return [g for g in groups if g["params"]]


def poly_factor(step: int, total: int, power: float, warmup: int = 0) -> float:
    """Poly decay (1 - step/total)^power, after an optional linear warm-up."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - step / total) ** power


def build_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    d = cfg.data
    train_tf = train_transform(crop_size=d.crop_size, scales=d.scales, flip=d.flip, jitter=d.jitter or None,
                               mean=d.mean, std=d.std, ignore_index=cfg.loss.ignore_index)  # fmt: skip
    eval_tf = eval_transform(mean=d.mean, std=d.std, pad_multiple=d.eval_pad_multiple or None,
                             pad_offset=d.eval_pad_offset, ignore_index=cfg.loss.ignore_index)  # fmt: skip
    options = dict(d.options)
    val_options = dict(options)
    if d.dataset == "synthetic":  # generated: lengths per split instead of folders
        val_options["length"] = options.pop("val_length", 200)
        val_options.pop("val_length", None)
        root = None
    else:
        root = d.root
    train = build_dataset(d.dataset, root=root, split=d.train_split, transform=train_tf, seed=cfg.train.seed,
                          **options)  # fmt: skip
    val = build_dataset(d.dataset, root=root, split=d.val_split, transform=eval_tf, **val_options)
    return train, val


def infinite_batches(loader: DataLoader, sampler_epoch: Callable[[int], None] | None = None) -> Iterator:
    epoch = 0
    while True:
        if sampler_epoch is not None:
            sampler_epoch(epoch)
        yield from loader
        epoch += 1


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    cfg: Config,
    device: torch.device,
    *,
    max_images: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """One dataset-wide confusion matrix; whole / sliding-window / multi-scale + flip inference."""
    was_training = model.training
    model.eval()
    if cfg.eval.eval_stages is not None:
        set_eval_stages(model, cfg.eval.eval_stages)
    num_classes = cfg.model.num_classes
    matrix = ConfusionMatrix(num_classes, ignore_index=cfg.loss.ignore_index)
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    indices = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="eval", unit="img", leave=False)
    e = cfg.eval
    for i in indices:
        image, label = dataset[i]
        with autocast(device, cfg.train.precision):
            probs = infer(model, image[None].to(device), mode=e.mode, scales=tuple(e.scales), flip=e.flip,
                          crop_size=e.crop_size, stride=e.stride, num_classes=num_classes,
                          align_corners=cfg.model.align_corners)  # fmt: skip
        matrix.update(probs.argmax(1).cpu(), label[None])
    matrix.all_reduce()
    model.train(was_training)
    results = matrix.compute()
    results["images"] = n
    return results


def _jsonable(results: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in results.items():
        if isinstance(v, torch.Tensor | np.ndarray):
            v = v.tolist()
        if isinstance(v, float) and math.isnan(v):
            v = None
        if isinstance(v, list):
            v = [None if isinstance(x, float) and math.isnan(x) else x for x in v]
        out[k] = v
    return out


# ----------------------------------------------------------------------------- training


class MetricsLog:
    """metrics.jsonl in the run folder, plus TensorBoard scalars when tensorboard is installed."""

    def __init__(self, folder: Path):
        self.path = folder / "metrics.jsonl"
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / "tb"))
        except ImportError:  # optional extra
            pass

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "iter" and isinstance(v, int | float) and v is not None:
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["iter"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(cfg: Config, *, resume: bool = False, log: Log = print, progress: bool = True) -> dict[str, Any]:
    """Train a model as configured; returns the final evaluation results and the run folder."""
    cfg.validate()
    t = cfg.train
    run = Path(t.out_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    seed_everything(t.seed, t.deterministic)
    device = select_device(t.device)

    # ---- model, data, optimizer
    model = build_model(cfg.model).to(device)
    train_set, val_set = build_datasets(cfg)
    if len(train_set) == 0:
        raise ValueError(f"the training split '{cfg.data.train_split}' of {cfg.data.dataset} is empty")
    loader = DataLoader(train_set, batch_size=t.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, worker_init_fn=worker_init_fn,
                        persistent_workers=cfg.data.num_workers > 0,
                        generator=torch.Generator().manual_seed(t.seed))  # fmt: skip
    if len(loader) == 0:
        raise ValueError(f"train.batch_size={t.batch_size} is larger than the training set ({len(train_set)})")
    o = cfg.optim
    optimizer = torch.optim.SGD(param_groups(model, o.lr, o.weight_decay, o.reference_groups), lr=o.lr,
                                momentum=o.momentum)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    criterion = SegmentationLoss(ignore_index=cfg.loss.ignore_index, reduction=cfg.loss.reduction,  # type: ignore[arg-type]
                                 aux_weight=cfg.loss.aux_weight if cfg.model.aux else 0.0)  # fmt: skip
    units = ema_units(model)
    for unit in units:  # the moving average sees the whole accumulated batch
        unit.defer_bases_update = t.accum_steps > 1

    # ---- resume
    start = 0
    if resume:
        path = latest_checkpoint(run)
        if path is None:
            log(f"--resume: no checkpoint in {run}, starting from scratch")
        else:
            ckpt = load_checkpoint(path, map_location=device)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            start = ckpt["iteration"]
            torch.set_rng_state(ckpt["rng"]["torch"])
            log(f"resumed from {path} at iteration {start}")

    log(f"device {device}, precision {t.precision}, global batch {t.batch_size} x 1 process x "
        f"{t.accum_steps} accumulation = {t.batch_size * t.accum_steps}; run folder {run}")  # fmt: skip
    metrics_log = MetricsLog(run)
    batches = infinite_batches(loader)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=t.iterations, initial=start, desc="train", unit="it", dynamic_ncols=True)
    model.train()
    t0, seen = time.perf_counter(), 0
    for it in range(start, t.iterations):
        # LR for this step (poly, per-group multiplier)
        factor = poly_factor(it, t.iterations, o.power, o.warmup_iters)
        for g in optimizer.param_groups:
            g["lr"] = o.lr * g["lr_mult"] * factor

        # forward/backward over micro-batches
        loss_sum = 0.0
        for _ in range(t.accum_steps):
            images, labels = next(batches)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, t.precision):
                outputs = model(images)
                loss = criterion(outputs, labels) / t.accum_steps
            scaler.scale(loss).backward()
            loss_sum += loss.item()
            seen += images.shape[0]
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"non-finite loss {loss_sum} at iteration {it + 1}; last good checkpoint "
                                     f"kept in {run}")  # fmt: skip
        if t.accum_steps > 1:
            for unit in units:
                unit.apply_bases_update()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        # log, checkpoint, evaluate
        step = it + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{o.lr * factor:.2e}")
        if step % t.log_interval == 0 or step == t.iterations:
            elapsed = time.perf_counter() - t0
            metrics_log.write({"kind": "train", "iter": step, "loss": loss_sum, "lr": o.lr * factor,
                               "images_per_s": seen / max(elapsed, 1e-9)})  # fmt: skip
        if step % t.checkpoint_interval == 0 or step == t.iterations:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "iteration": step, "config": cfg.to_dict(),
                     "rng": {"torch": torch.get_rng_state()}}  # fmt: skip
            save_checkpoint(state, run, step, keep=t.keep_checkpoints)
        if t.eval_interval and step % t.eval_interval == 0 and step != t.iterations:
            res = evaluate(model, val_set, cfg, device, max_images=t.max_eval_images)
            metrics_log.write({"kind": "val", "iter": step, "mIoU": float(res["mIoU"]), "aAcc": float(res["aAcc"])})
            log(f"iter {step}: val mIoU {100 * float(res['mIoU']):.2f}")
    if bar is not None:
        bar.close()

    results = evaluate(model, val_set, cfg, device, max_images=t.max_eval_images, progress=progress)
    metrics_log.write({"kind": "val", "iter": t.iterations, "mIoU": float(results["mIoU"]),
                       "aAcc": float(results["aAcc"])})  # fmt: skip
    metrics_log.close()
    results = _jsonable(results)
    (run / "eval.json").write_text(json.dumps(results, indent=2))
    return {"run": str(run), "results": results, "class_names": list(getattr(val_set, "classes", [])), "model": model}
