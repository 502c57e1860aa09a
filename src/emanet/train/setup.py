"""Set-up of a training run: the run folder, the data (checked), model, optimizer and the resumed state,
gathered in one ``TrainRun`` that the loop in engine.py uses; and the ways a run ends early.

Rank 0 takes every decision about the run folder (emanet.train.runs) and the other ranks follow it
(``on_rank0``): a refusal, a failed check or a failed write is a RunError on every rank, said once.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

from emanet.checkpoint import RESUME_KEYS, load_checkpoint, restore_training_state
from emanet.config import Config, TrainConfig, save_config
from emanet.losses import SegmentationLoss
from emanet.models.em import EMAUnit, ema_units
from emanet.models.emanet import build_model
from emanet.runtime import maybe_compile
from emanet.train.data import build_datasets, check_class_count, check_val_files, skip_bad_samples
from emanet.train.distributed import (
    DataStream,
    DistEnv,
    PerSampleSeed,
    ResumableSampler,
    bn_statistics,
    broadcast_buffers_,
    broadcast_object,
    set_rng_state,
    worker_init,
    wrap_ddp,
)
from emanet.train.runs import (
    CONFIG,
    cut_metrics,
    os_reason,
    prepare_run_folder,
    resume_point,
    supersede_checkpoints,
    write_classes,
)

Log = Callable[[str], None]

EXIT_USAGE = 2  # the run folder, the config or a write refused the run; nothing of an earlier run changed
EXIT_INTERRUPTED = 3  # SIGTERM/SIGINT: checkpoint saved at the current step; resume with --resume
EXIT_NONFINITE = 4  # non-finite loss (or too many skipped steps); choose a checkpoint with --resume-from


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


class RunError(TrainingStopped):
    """The run cannot start or go on: run folder in use or holding another run, a config a resume may not
    take, a failed write. Raised on every rank with rank 0's message."""

    exit_code = EXIT_USAGE


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


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


@dataclass
class TrainRun:
    """What set-up builds and the loop, the step and the checkpoints use."""

    cfg: Config
    env: DistEnv
    folder: Path
    log: Log
    model: nn.Module  # the replica (its state dict, its EM units)
    net: nn.Module  # what the forward calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    stream: DataStream
    val_set: Dataset
    class_names: list[str]
    palette: list[list[int]]
    start: int = 0  # the iteration training continues from
    skipped: int = 0  # steps skipped for non-finite losses (train.on_nonfinite=skip)
    consecutive: int = 0  # ... of them in a row, up to now
    seen: int = 0  # images this process read since start (throughput)
    last_ckpt: str | None = None
    units: list[EMAUnit] = field(default_factory=list)
    bn_buffers: list[torch.Tensor] = field(default_factory=list)  # restored when a step is skipped
    bn_stats: list[torch.Tensor] = field(default_factory=list)  # averaged over ranks after each step


def on_rank0(env: DistEnv, step: int, checkpoint: str | None, action: Callable[[], Any]) -> Any:
    """Run ``action`` on rank 0; its ValueError (RunFolderError, a config or data check) or OSError becomes a
    RunError on every rank, said once."""
    error, value = None, None
    if env.is_main:
        try:
            value = action()
        except ValueError as e:
            error = str(e)
        except OSError as e:
            error = f"cannot write {os_reason(e)}"
    error = broadcast_object(error, env)  # also the barrier: nobody goes on before rank 0 is done
    if error is not None:
        raise RunError(error, iteration=step, checkpoint=checkpoint, rank=env.rank)
    return value


def setup(
    cfg: Config,
    env: DistEnv,
    held: contextlib.ExitStack,
    *,
    resume: bool,
    resume_from: str | Path | None,
    overwrite: bool,
    log: Log,
) -> TrainRun:
    """Run folder -> data (checked) -> model, optimizer -> resume -> the run's files. Nothing is written into
    the folder before every check passed; ``held`` keeps the folder's lock until the run ends."""
    t, run, device = cfg.train, Path(cfg.train.out_dir), env.device

    def open_folder():  # rank 0: lock, refuse or move aside an earlier run, stale temporaries, resume point
        held.callback(prepare_run_folder(run, resume=resume, overwrite=overwrite, log=log).release)
        return resume_point(run, resume_from, cfg.to_dict(), log) if resume else None

    found = on_rank0(env, 0, None, open_folder)
    train_set, val_set, class_names, palette = _checked_datasets(cfg, env, log)
    _seed_for_init(t, device)  # the same seed everywhere: identical initial replicas
    model, synced_bn = _build_model(cfg, env, log)
    loader, sampler = _train_loader(train_set, cfg, env, run, log)
    optimizer, scaler, criterion = _optimizer_and_loss(model, cfg, device)
    units, bn_buffers, bn_stats = _step_state(model, cfg, env, synced_bn)

    seed_everything(t.seed + env.rank)  # per-rank streams (dropout); the model is built already
    start, skipped, position, rng_states, last_ckpt = 0, 0, (0, 0), None, None
    if resume:  # rank 0 picked the checkpoint, every rank loads it
        start, skipped, position, rng_states, last_ckpt = _resume(found, model, optimizer, scaler, cfg, env, log)
        del found
    broadcast_buffers_(model, env)  # rank 0's buffers everywhere, whatever DDP's init sync does
    # Buffers are not broadcast on every forward: the EM bases are identical on every rank by construction
    # (all-reduced update), and re-broadcasting would overwrite the per-rank batch sums that gradient
    # accumulation collects between forwards. BN statistics are averaged per step instead.
    net = wrap_ddp(model, device) if env.distributed else model
    net = maybe_compile(net, t.compile)  # opt-in; checkpoints and evaluation use `model` itself
    stream = DataStream(loader, sampler, *position)
    if rng_states is not None:
        set_rng_state(rng_states, device)
    _log_layout(cfg, env, stream, run, log)
    r = TrainRun(
        cfg,
        env,
        run,
        log,
        model,
        net,
        optimizer,
        scaler,
        criterion,
        stream,
        val_set,
        class_names,
        palette,
        start=start,
        skipped=skipped,
        last_ckpt=last_ckpt,
        units=units,
        bn_buffers=bn_buffers,
        bn_stats=bn_stats,
    )
    try:
        on_rank0(env, start, last_ckpt, lambda: _start_run(r, resume))
    except BaseException:
        stream.close()
        raise
    return r


def _checked_datasets(cfg: Config, env: DistEnv, log: Log) -> tuple[Dataset, Dataset, list[str], list[list[int]]]:
    """(train set, val set, class names, palette); file lists only, cheap, checked before anything heavy."""
    train_set, val_set = build_datasets(cfg)
    if len(train_set) == 0:  # type: ignore[arg-type]
        raise ValueError(f"the training split '{cfg.data.train_split}' of {cfg.data.dataset} is empty")
    on_rank0(env, 0, None, lambda: (check_class_count(cfg, train_set, val_set), check_val_files(val_set, cfg, log)))
    class_names = list(getattr(train_set, "classes", []))
    palette = [list(map(int, c)) for c in getattr(train_set, "palette", [])][: len(class_names)]
    return train_set, val_set, class_names, palette


def _seed_for_init(t: TrainConfig, device: torch.device) -> None:
    if t.deterministic and device.type == "cuda":  # cuBLAS needs this before its first handle
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    seed_everything(t.seed, t.deterministic)


def _step_state(
    model: nn.Module, cfg: Config, env: DistEnv, synced_bn: bool
) -> tuple[list[EMAUnit], list[torch.Tensor], list[torch.Tensor]]:
    """The EMA units (their bases blended once per step, over the global batch, after the finite-loss check),
    every BN buffer (restored after a skipped step) and the BN statistics averaged over ranks each step."""
    units = ema_units(model)
    for unit in units:
        unit.defer_bases_update = True
    bn_buffers = [b for m in model.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]
    average = env.distributed and not synced_bn and not cfg.train.freeze_bn
    return units, bn_buffers, bn_statistics(model) if average else []


def _log_layout(cfg: Config, env: DistEnv, stream: DataStream, run: Path, log: Log) -> None:
    t = cfg.train
    log(
        f"global batch = per-process batch x processes x accumulation = {t.batch_size} x {env.world_size} x "
        f"{t.accum_steps} = {t.batch_size * env.world_size * t.accum_steps}"
    )
    per_epoch = stream.per_epoch
    log(f"device {env.device}, precision {t.precision}, {per_epoch} batches per epoch and process, run folder {run}")


def _optimizer_and_loss(model: nn.Module, cfg: Config, device: torch.device):
    o = cfg.optim
    optimizer = torch.optim.SGD(
        param_groups(model, o.lr, o.weight_decay, o.reference_groups), lr=o.lr, momentum=o.momentum
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    criterion = SegmentationLoss(
        ignore_index=cfg.loss.ignore_index,
        reduction=cfg.loss.reduction,  # type: ignore[arg-type]
        aux_weight=cfg.loss.aux_weight if cfg.model.aux else 0.0,
    )
    return optimizer, scaler, criterion


def _resume(found, model, optimizer, scaler, cfg: Config, env: DistEnv, log: Log):
    """Every rank loads the checkpoint rank 0 chose (``found`` on rank 0): (start, skipped, data position,
    this rank's RNG state, checkpoint path); from scratch if there is none."""
    t = cfg.train
    path = broadcast_object(None if found is None else str(found[0]), env)
    if path is None:
        log(f"--resume: no checkpoint in {t.out_dir}, starting from scratch")
        return 0, 0, (0, 0), None, None
    ckpt = found[1] if found is not None else load_checkpoint(path, required=RESUME_KEYS)
    start, skipped, position, rng, exact = restore_training_state(
        ckpt,
        model,
        optimizer,
        scaler,
        batch_size=t.batch_size,
        accum_steps=t.accum_steps,
        world_size=env.world_size,
        rank=env.rank,
    )
    if not exact:
        log(
            "note: the checkpoint was written with another batch size, process count or format; training "
            "continues from its iteration, but will not repeat an uninterrupted run exactly"
        )
    log(f"resumed from {path} at iteration {start} (epoch {position[0]}, batch {position[1]})")
    return start, skipped, position, rng, path


def _build_model(cfg: Config, env: DistEnv, log: Log) -> tuple[nn.Module, bool]:
    model = build_model(cfg.model).to(env.device)
    if env.distributed and cfg.train.sync_bn:
        if env.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            log("BatchNorm -> SyncBatchNorm: statistics over the global batch")
        else:
            log(
                "train.sync_bn: SyncBatchNorm needs CUDA; each process normalises with its own batch and the "
                "running statistics are averaged over processes after every step"
            )
    return model, any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def _train_loader(train_set: Dataset, cfg: Config, env: DistEnv, run: Path, log: Log):
    t = cfg.train
    seeded = PerSampleSeed(skip_bad_samples(train_set, cfg, run), t.seed)
    if not seeded.seeded:
        log(
            "note: the training set has no reseed(); augmentation then depends on worker order, and a resumed "
            "run does not repeat an uninterrupted one exactly"
        )
    sampler = ResumableSampler(seeded, num_replicas=env.world_size, rank=env.rank, seed=t.seed)
    loader = DataLoader(
        seeded,
        batch_size=t.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        worker_init_fn=worker_init,
        persistent_workers=cfg.data.num_workers > 0,
        pin_memory=env.device.type == "cuda",
        generator=torch.Generator().manual_seed(t.seed + env.rank),
    )
    if sampler.num_samples < t.batch_size:
        raise ValueError(
            f"train.batch_size={t.batch_size} is larger than the {sampler.num_samples} training "
            f"samples per process ({env.world_size} process(es))"
        )
    return loader, sampler


def _start_run(r: TrainRun, resume: bool) -> None:
    """The run starts (rank 0): its config, class names and palette; a resume cuts what came after it."""
    save_config(r.cfg, r.folder / CONFIG)
    if r.class_names:
        write_classes(r.folder, r.class_names, r.palette)
    if resume:
        moved = supersede_checkpoints(r.folder, r.start, r.last_ckpt)
        if moved:
            r.log(f"checkpoints after iteration {r.start} moved to {moved}")
        cut = cut_metrics(r.folder, r.start)
        if cut:
            r.log(f"metrics.jsonl cut back to iteration {r.start}: {cut} later line(s) moved to metrics.cut.jsonl")
