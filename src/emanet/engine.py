"""Training and evaluation loops for any model that returns logits, in one process or under torchrun.

`train(cfg)` reads top to bottom: set-up (process group, model, data, optimizer) -> resume -> for each step:
micro-batches (autocast forward, loss, backward; DDP syncs gradients on the last one) -> one all-reduce of
(loss, non-finite flag, stop vote) -> EMA bases update over the global batch, optimizer step, or a skipped
step -> LR schedule -> log -> checkpoint -> evaluate. Only rank 0 logs and writes files.

Exit statuses a caller can return (cli.cmd_train does): 0 done, EXIT_INTERRUPTED (3) stopped by
SIGTERM/SIGINT after saving a checkpoint, EXIT_NONFINITE (4) stopped on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

from emanet.checkpoint import RESUME_KEYS, load_checkpoint, load_latest_checkpoint, save_checkpoint
from emanet.compiled import maybe_compile
from emanet.config import Config, save_config
from emanet.data import build_dataset
from emanet.data.transforms import eval_transform, train_transform
from emanet.distributed import (
    DataStream,
    DistEnv,
    PerSampleSeed,
    ResumableSampler,
    StopSignals,
    agree,
    average_,
    barrier,
    bn_statistics,
    broadcast_buffers_,
    broadcast_object,
    cleanup_distributed,
    gather_objects,
    init_distributed,
    rng_state,
    select_device,
    set_rng_state,
    state_digest,
    worker_init,
    wrap_ddp,
)
from emanet.em import EMAUnit, ema_units, set_eval_stages
from emanet.inference import infer
from emanet.losses import SegmentationLoss
from emanet.metrics import ConfusionMatrix, scores
from emanet.models.emanet import build_model

Log = Callable[[str], None]

EXIT_INTERRUPTED = 3  # SIGTERM/SIGINT: checkpoint saved at the current step; resume with --resume
EXIT_NONFINITE = 4  # non-finite loss (or too many skipped steps); the last good checkpoint is kept

__all__ = ["EXIT_INTERRUPTED", "EXIT_NONFINITE", "NonFiniteLoss", "TrainingInterrupted", "TrainingStopped",
           "autocast", "evaluate", "select_device", "train"]  # fmt: skip


class TrainingStopped(RuntimeError):
    """Training ended early on purpose; ``exit_code`` is the process status to return."""

    exit_code = 1

    def __init__(self, message: str, *, iteration: int, checkpoint: str | None, rank: int = 0):
        super().__init__(message)
        self.iteration, self.checkpoint, self.rank = iteration, checkpoint, rank


class TrainingInterrupted(TrainingStopped):
    exit_code = EXIT_INTERRUPTED


class NonFiniteLoss(TrainingStopped):
    exit_code = EXIT_NONFINITE


# ----------------------------------------------------------------------------- set-up helpers


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


def _skip_bad_samples(dataset: Dataset, cfg: Config, run: Path) -> Dataset:
    if cfg.data.on_bad_sample != "skip":
        return dataset
    try:
        from emanet.data import SkipBadSamples  # type: ignore[attr-defined]
    except ImportError:
        raise ValueError("data.on_bad_sample=skip needs emanet.data.SkipBadSamples, which this version of "
                         "emanet lacks; use data.on_bad_sample=raise") from None  # fmt: skip
    return SkipBadSamples(dataset, log_path=run / "bad_samples.txt")


def _count_bad_samples(path: Path) -> int:
    """Distinct files in the skip log (one "path<TAB>reason" line per file; ranks may repeat a file)."""
    if not path.is_file():
        return 0
    return len({line.split("\t", 1)[0] for line in path.read_text().splitlines() if line.strip()})


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
    """One dataset-wide confusion matrix; whole / sliding-window / multi-scale + flip inference.

    Under torch.distributed each rank evaluates images rank, rank + world, ... and the matrices are summed
    once, so every image counts exactly once and every rank returns the same results.
    """
    was_training = model.training
    model.eval()
    if cfg.eval.eval_stages is not None:
        set_eval_stages(model, cfg.eval.eval_stages)
    num_classes = cfg.model.num_classes
    matrix = ConfusionMatrix(num_classes, ignore_index=cfg.loss.ignore_index)
    n = len(dataset) if not max_images else min(max_images, len(dataset))  # type: ignore[arg-type]
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    indices = range(rank, n, world)
    if progress and rank == 0:
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
    m = matrix.matrix
    if world > 1:  # NCCL reduces CUDA tensors only
        m = m.to(device)
        torch.distributed.all_reduce(m)
    model.train(was_training)
    results = scores(m.cpu())
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


def _set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:  # running statistics used as constants, never updated
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def _discard_bases_update(units: list[EMAUnit]) -> None:
    # the batch estimates accumulated by a skipped step never reach the stored bases
    for unit in units:
        unit._acc_sum.zero_()
        unit._acc_count.zero_()


def train(
    cfg: Config, *, resume: bool = False, log: Log = print, progress: bool = True, stop_at: int | None = None
) -> dict[str, Any]:
    """Train as configured, in one process or one of torchrun's; returns the final evaluation and the run folder.

    ``stop_at``: stop after that iteration exactly as a SIGTERM would (checkpoint, then TrainingInterrupted).
    Raises TrainingInterrupted / NonFiniteLoss (both TrainingStopped, with ``exit_code``) on early stops.
    """
    cfg.validate()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    env = init_distributed(cfg.train.device)
    try:
        with StopSignals() as signals:
            return _train(cfg, env, signals, resume=resume, log=log if env.is_main else (lambda _: None),
                          progress=progress and env.is_main, stop_at=stop_at)  # fmt: skip
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        cleanup_distributed(env)


def _train(cfg: Config, env: DistEnv, signals: StopSignals, *, resume: bool, log: Log, progress: bool,
           stop_at: int | None) -> dict[str, Any]:  # fmt: skip
    t, o = cfg.train, cfg.optim
    run, device = Path(t.out_dir), env.device
    run.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        save_config(cfg, run / "config.yaml")
    if t.deterministic and device.type == "cuda":  # cuBLAS needs this before its first handle
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    seed_everything(t.seed, t.deterministic)  # the same seed everywhere: identical initial replicas

    # ---- model, data, optimizer
    model = build_model(cfg.model).to(device)
    if env.distributed and t.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            log("BatchNorm -> SyncBatchNorm: statistics over the global batch")
        else:
            log("train.sync_bn: SyncBatchNorm needs CUDA; each process normalises with its own batch and the "
                "running statistics are averaged over processes after every step")  # fmt: skip
    synced_bn = any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    train_set, val_set = build_datasets(cfg)
    if len(train_set) == 0:  # type: ignore[arg-type]
        raise ValueError(f"the training split '{cfg.data.train_split}' of {cfg.data.dataset} is empty")
    seeded = PerSampleSeed(_skip_bad_samples(train_set, cfg, run), t.seed)
    if not seeded.seeded:
        log("note: the training set has no reseed(); augmentation then depends on worker order, and a resumed "
            "run does not repeat an uninterrupted one exactly")  # fmt: skip
    sampler = ResumableSampler(seeded, num_replicas=env.world_size, rank=env.rank, seed=t.seed)
    loader = DataLoader(seeded, batch_size=t.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, worker_init_fn=worker_init,
                        persistent_workers=cfg.data.num_workers > 0, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(t.seed + env.rank))  # fmt: skip
    if sampler.num_samples < t.batch_size:
        raise ValueError(f"train.batch_size={t.batch_size} is larger than the {sampler.num_samples} training "
                         f"samples per process ({env.world_size} process(es))")  # fmt: skip
    optimizer = torch.optim.SGD(param_groups(model, o.lr, o.weight_decay, o.reference_groups), lr=o.lr,
                                momentum=o.momentum)  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    criterion = SegmentationLoss(ignore_index=cfg.loss.ignore_index, reduction=cfg.loss.reduction,  # type: ignore[arg-type]
                                 aux_weight=cfg.loss.aux_weight if cfg.model.aux else 0.0)  # fmt: skip
    units = ema_units(model)
    for unit in units:  # blended once per step, over the global batch, after the finite-loss check
        unit.defer_bases_update = True
    bn_buffers = [b for m in model.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]
    bn_stats = bn_statistics(model) if env.distributed and not synced_bn and not t.freeze_bn else []

    # ---- resume: rank 0 picks the newest intact checkpoint, every rank loads it
    start, skipped, position, rng_states, last_ckpt = 0, 0, (0, 0), None, None
    seed_everything(t.seed + env.rank)  # per-rank streams (dropout); the model is built already
    if resume:
        found = load_latest_checkpoint(run, required=RESUME_KEYS, log=log) if env.is_main else None
        last_ckpt = broadcast_object(None if found is None else str(found[0]), env)
        if last_ckpt is None:
            log(f"--resume: no checkpoint in {run}, starting from scratch")
        else:
            ckpt = found[1] if found is not None else load_checkpoint(last_ckpt, required=RESUME_KEYS)
            start, skipped, position, rng_states = _restore(ckpt, model, optimizer, scaler, env, cfg, log)
            log(f"resumed from {last_ckpt} at iteration {start} (epoch {position[0]}, batch {position[1]})")
            del ckpt, found
    broadcast_buffers_(model, env)  # rank 0's buffers everywhere, whatever DDP's init sync does
    net: nn.Module = model
    if env.distributed:
        # Buffers are not broadcast on every forward: the EM bases are identical on every rank by
        # construction (all-reduced update), and re-broadcasting would overwrite the per-rank batch sums
        # that gradient accumulation collects between forwards. BN statistics are averaged per step instead.
        net = wrap_ddp(model, device)
    net = maybe_compile(net, t.compile)  # opt-in; checkpoints and evaluation use `model` itself
    stream = DataStream(loader, sampler, *position)
    if rng_states is not None:
        set_rng_state(rng_states, device)

    global_batch = t.batch_size * env.world_size * t.accum_steps
    log(f"global batch = per-process batch x processes x accumulation = {t.batch_size} x {env.world_size} x "
        f"{t.accum_steps} = {global_batch}")  # fmt: skip
    log(f"device {device}, precision {t.precision}, {stream.per_epoch} batches per epoch and process, "
        f"run folder {run}")  # fmt: skip
    metrics_log = MetricsLog(run) if env.is_main else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=t.iterations, initial=start, desc="train", unit="it", dynamic_ncols=True)
    _set_train_mode(model, t.freeze_bn)
    t0, seen, consecutive = time.perf_counter(), 0, 0

    def checkpoint(step: int) -> str | None:
        # every rank contributes its RNG state and a digest of its replica; rank 0 writes
        rngs, digests = gather_objects(rng_state(device), env), gather_objects(state_digest(model), env)
        path = None
        if env.is_main:
            assert rngs is not None and digests is not None
            if any(d != digests[0] for d in digests):
                bad = [r for r, d in enumerate(digests) if d != digests[0]]
                log(f"warning: at iteration {step} the replicas of ranks {bad} differ from rank 0's")
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "iteration": step, "config": cfg.to_dict(),
                     "schedule": {"kind": "poly", "base_lr": o.lr, "power": o.power, "warmup": o.warmup_iters,
                                  "total": t.iterations},
                     "rng": rngs, "data": stream.state_dict(), "skipped_steps": skipped,
                     "replicas": digests, "world_size": env.world_size}  # fmt: skip
            path = str(save_checkpoint(state, run, step, keep=t.keep_checkpoints))
        barrier(env)  # nobody leaves (or exits) before the file is complete
        return path

    try:
        for it in range(start, t.iterations):
            step = it + 1
            factor = poly_factor(it, t.iterations, o.power, o.warmup_iters)
            for g in optimizer.param_groups:
                g["lr"] = o.lr * g["lr_mult"] * factor
            saved_bn = [b.clone() for b in bn_buffers] if t.on_nonfinite == "skip" else None

            # forward/backward over micro-batches; DDP all-reduces gradients on the last one only. The loss
            # stays on the device: the vote below is the step's only host sync.
            loss_sum = torch.zeros((), device=device)
            for micro in range(t.accum_steps):
                images, labels = stream.next()
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                sync = contextlib.nullcontext()
                if env.distributed and micro < t.accum_steps - 1:
                    sync = net.no_sync()  # type: ignore[operator]
                with sync:
                    with autocast(device, t.precision):
                        loss = criterion(net(images), labels) / t.accum_steps
                    scaler.scale(loss).backward()
                loss_sum += loss.detach().float()
                seen += images.shape[0]

            # one all-reduce (and host sync): mean loss, any rank non-finite, any rank asked to stop
            stop_vote = signals.requested or (stop_at is not None and step >= stop_at)
            vote = torch.stack([loss_sum, (~loss_sum.isfinite()).float(), loss_sum.new_tensor(float(stop_vote))])
            total, bad, votes = agree(vote, env)
            loss_mean = total / env.world_size
            if bad:
                if t.on_nonfinite == "stop":
                    raise NonFiniteLoss(
                        f"non-finite loss ({loss_mean}) at iteration {step}: stopped without applying or saving "
                        f"this step; last good checkpoint: {last_ckpt or 'none'}. Resume with --resume, e.g. with "
                        "a lower optim.lr, or set train.on_nonfinite=skip to drop such steps",
                        iteration=step, checkpoint=last_ckpt, rank=env.rank)  # fmt: skip
                skipped, consecutive = skipped + 1, consecutive + 1
                optimizer.zero_grad(set_to_none=True)
                _discard_bases_update(units)
                for b, saved in zip(bn_buffers, saved_bn or []):
                    b.copy_(saved)
                if scaler.is_enabled():  # fp16 overflow in the forward: back off the scale as AMP would
                    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
                log(f"iteration {step}: non-finite loss, step skipped ({skipped} skipped so far)")
                if t.max_consecutive_skips and consecutive >= t.max_consecutive_skips:
                    raise NonFiniteLoss(
                        f"{consecutive} consecutive non-finite losses up to iteration {step} "
                        f"(train.max_consecutive_skips={t.max_consecutive_skips}); last good checkpoint: "
                        f"{last_ckpt or 'none'}", iteration=step, checkpoint=last_ckpt, rank=env.rank)  # fmt: skip
            else:
                consecutive = 0
                for unit in units:
                    unit.apply_bases_update()  # all-reduced sums and counts: the global batch's mean
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                average_(bn_stats, env)

            # log, checkpoint, stop, evaluate
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{o.lr * factor:.2e}", skipped=skipped)
            if metrics_log is not None and (step % t.log_interval == 0 or step == t.iterations or bad):
                elapsed = time.perf_counter() - t0
                metrics_log.write({"kind": "train", "iter": step, "loss": loss_mean if not bad else None,
                                   "lr": o.lr * factor, "skipped": skipped,
                                   "images_per_s": seen * env.world_size / max(elapsed, 1e-9)})  # fmt: skip
            stopping = votes > 0 and step < t.iterations
            if step % t.checkpoint_interval == 0 or step == t.iterations or stopping:
                last_ckpt = checkpoint(step)
            if stopping:
                why = f"signal {signals.received}" if signals.requested else "stop_at"
                message = f"stopped at iteration {step} ({why}); checkpoint {last_ckpt}; continue with --resume"
                raise TrainingInterrupted(message, iteration=step, checkpoint=last_ckpt, rank=env.rank)
            if t.eval_interval and step % t.eval_interval == 0 and step != t.iterations:
                res = evaluate(model, val_set, cfg, device, max_images=t.max_eval_images)
                _set_train_mode(model, t.freeze_bn)
                if metrics_log is not None:
                    metrics_log.write({"kind": "val", "iter": step, "mIoU": float(res["mIoU"]),
                                       "aAcc": float(res["aAcc"])})  # fmt: skip
                log(f"iter {step}: val mIoU {100 * float(res['mIoU']):.2f}")
        if bar is not None:
            bar.close()
            bar = None

        results = _jsonable(evaluate(model, val_set, cfg, device, max_images=t.max_eval_images, progress=progress))
        barrier(env)  # every rank's bad-sample lines are written
        summary = {"iterations": t.iterations, "skipped_steps": skipped,
                   "bad_samples": _count_bad_samples(run / "bad_samples.txt")}  # fmt: skip
        if metrics_log is not None:
            metrics_log.write({"kind": "val", "iter": t.iterations, "mIoU": results["mIoU"], "aAcc": results["aAcc"],
                               **summary})  # fmt: skip
            (run / "eval.json").write_text(json.dumps({**results, "train": summary}, indent=2))
    finally:
        stream.close()
        if bar is not None:
            bar.close()
        if metrics_log is not None:
            metrics_log.close()
    if skipped:
        log(f"{skipped} step(s) skipped for non-finite losses")
    if summary["bad_samples"]:
        log(f"{summary['bad_samples']} bad training file(s) skipped; listed in {run / 'bad_samples.txt'}")
    return {"run": str(run), "results": results, "class_names": list(getattr(val_set, "classes", [])),
            "model": model, "rank": env.rank, "world_size": env.world_size, **summary}  # fmt: skip


def _restore(
    ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    env: DistEnv, cfg: Config, log: Log,
) -> tuple[int, int, tuple[int, int], dict[str, Any] | None]:  # fmt: skip
    """Load a training checkpoint; returns (iteration, skipped steps, (epoch, batch), this rank's RNG state)."""
    t = cfg.train
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    start = int(ckpt["iteration"])
    exact, rng = True, ckpt.get("rng")
    data = ckpt.get("data")
    if data is None:  # format 1: only the iteration is known
        exact, consumed = False, start * t.accum_steps
        position = (0, consumed)
    elif data["batch_size"] != t.batch_size or data["world_size"] != env.world_size:
        exact = False
        samples = data["batches"] * data["batch_size"] * data["world_size"]
        position = (data["epoch"], samples // (t.batch_size * env.world_size))
    else:
        position = (data["epoch"], data["batches"])
    own = None
    if isinstance(rng, list) and len(rng) == env.world_size:
        own = rng[env.rank]
    else:
        exact = False
        if isinstance(rng, dict) and "torch" in rng:  # format 1: rank 0's torch generator
            torch.set_rng_state(rng["torch"])
    if not exact:
        log("note: the checkpoint was written with another batch size, process count or format; training "
            "continues from its iteration, but will not repeat an uninterrupted run exactly")  # fmt: skip
    return start, int(ckpt.get("skipped_steps", 0)), position, own
