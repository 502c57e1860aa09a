"""Set-up of a training run: the run folder, the data (checked), model, optimizer, schedule and the resumed
state, gathered in one ``TrainRun`` that the loop in train/loop.py uses, with the run's ``Counters``.

Rank 0 takes every decision about the run folder (emanet.train.runs) and the other ranks follow it
(``on_rank0``): a refusal, a failed check or a failed write is a RunError on every rank, said once. Only
rank 0 logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from emanet.checkpoint import RESUME_KEYS, Resumed, load_checkpoint, restore_training_state
from emanet.config import Config, TrainConfig, save_config
from emanet.errors import ConfigError, RunFolderError, UserError
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
    BAD_SAMPLES,
    CONFIG,
    METRICS,
    METRICS_CUT,
    cut_metrics,
    os_reason,
    prepare_run_folder,
    resume_point,
    supersede_checkpoints,
    write_classes,
)

logger = logging.getLogger(__name__)

EXIT_USAGE = 2  # the run folder, the config or a write refused the run; nothing of an earlier run changed


class TrainingStopped(RuntimeError):
    """Training ended early on purpose; ``exit_code`` is the process status to return.

    Raised on every rank alike; the message is said once, by the rank where ``speaks`` (rank 0). ``reported``
    is set by whoever said it (emanet train, before the ranks meet), so the CLI does not say it twice.
    """

    exit_code = 1

    def __init__(self, message: str, *, iteration: int, checkpoint: str | None, rank: int = 0, advice: str = ""):
        super().__init__(f"{message}; {advice}" if advice else message)
        self.reason, self.advice = message, advice  # what happened; how to continue (`--resume`)
        self.iteration, self.checkpoint, self.rank = iteration, checkpoint, rank
        self.reported = False

    @property
    def speaks(self) -> bool:
        return self.rank == 0


class RunError(TrainingStopped):
    """The run cannot start or go on: run folder in use or holding another run, a config a resume may not
    take, a failed write. Raised on every rank with rank 0's message (``on_rank0``)."""

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


def poly_schedule(optimizer: torch.optim.Optimizer, cfg: Config, state: dict[str, Any] | None = None) -> LambdaLR:
    """Each group's rate = optim.lr x lr_mult x poly_factor(iteration), as a LambdaLR; stepped once per iteration.

    ``state``: the schedule's state_dict from a resumed checkpoint, which gives its position (last_epoch). The
    rates and the decay come from the current config even then: a resume may change optim.lr,
    optim.warmup_iters and train.iterations (runs.RESUME_MAY_CHANGE), which load_state_dict would undo.
    """
    for group in optimizer.param_groups:  # LambdaLR scales each group's initial rate; a resumed optimizer
        group["initial_lr"] = cfg.optim.lr * group["lr_mult"]  # carries the checkpoint's

    def factor(iteration: int) -> float:
        return poly_factor(iteration, cfg.train.iterations, cfg.optim.power, cfg.optim.warmup_iters)

    position = 0 if state is None else int(state["last_epoch"])
    return LambdaLR(optimizer, factor, last_epoch=position - 1)  # its first step() sets the rates at position


@dataclass
class TrainRun:
    """What set-up builds once and the loop, the step and the checkpoints use."""

    cfg: Config
    env: DistEnv
    folder: Path
    model: nn.Module  # the replica (its state dict, its EM units)
    net: nn.Module  # what the forward calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    stream: DataStream
    val_set: Dataset
    class_names: list[str]
    palette: list[list[int]]
    units: list[EMAUnit]  # their bases blended once per step, after the finite-loss check
    bn_buffers: list[torch.Tensor]  # restored when a step is skipped
    bn_stats: list[torch.Tensor]  # averaged over ranks after each step


@dataclass
class Counters:
    """What changes as the run goes."""

    start: int = 0  # the iteration training continues from
    step: int = 0  # the iteration in progress (what a lost peer interrupted)
    skipped: int = 0  # steps skipped for non-finite losses (train.on_nonfinite=skip)
    consecutive: int = 0  # ... of them in a row, up to now
    seen: int = 0  # images this process read since start (throughput)
    last_checkpoint: str | None = None


def on_rank0(env: DistEnv, step: int, checkpoint: str | None, action: Callable[[], Any]) -> Any:
    """Run ``action`` on rank 0; its UserError (a run folder, config or data check) or OSError becomes a
    RunError on every rank, said once. Any other exception is a bug and keeps its traceback."""
    error, value = None, None
    if env.is_main:
        try:
            value = action()
        except UserError as e:
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
) -> tuple[TrainRun, Counters]:
    """Run folder -> data (checked) -> model, optimizer -> resume -> schedule -> the run's files. Nothing is written
    into the folder before every check passed; ``held`` keeps the folder's lock until the run ends."""
    folder, device = Path(cfg.train.out_dir), env.device

    def open_folder():  # rank 0: lock, refuse or move aside an earlier run, stale temporaries, resume point
        held.callback(prepare_run_folder(folder, resume=resume, overwrite=overwrite).release)
        return _resume_point(folder, resume_from, cfg) if resume else None

    found = on_rank0(env, 0, None, open_folder)
    train_set, val_set, class_names, palette = _checked_datasets(cfg, env)
    _seed_for_init(cfg.train, device)  # the same seed everywhere: identical initial replicas
    model, synced_bn = _build_model(cfg, env)
    loader, sampler = _train_loader(train_set, cfg, env, folder)
    optimizer, scaler, criterion = _optimizer_and_loss(model, cfg, device)
    units, bn_buffers, bn_stats = _step_state(model, cfg, env, synced_bn)
    seed_everything(cfg.train.seed + env.rank)  # per-rank streams (dropout); the model is built already
    # rank 0 picked the checkpoint, every rank loads it
    resumed, counters = _resume(found, model, optimizer, scaler, cfg, env) if resume else (None, Counters())
    del found  # rank 0's copy of the checkpoint
    broadcast_buffers_(model, env)  # rank 0's buffers everywhere, once (not on every forward: see wrap_ddp)
    # compile is opt-in; checkpoints and evaluation use `model` itself
    net = maybe_compile(wrap_ddp(model, device) if env.distributed else model, cfg.train.compile)
    stream = DataStream(loader, sampler, *(resumed.position if resumed else (0, 0)))
    if resumed is not None and resumed.rng is not None:
        set_rng_state(resumed.rng, device)
    scheduler = poly_schedule(optimizer, cfg, resumed.scheduler if resumed is not None else None)
    run = TrainRun(
        cfg,
        env,
        folder,
        model,
        net,
        optimizer,
        scheduler,
        scaler,
        criterion,
        stream,
        val_set,
        class_names,
        palette,
        units,
        bn_buffers,
        bn_stats,
    )
    try:
        on_rank0(env, counters.start, counters.last_checkpoint, lambda: _start_run(run, counters, resume))
    except BaseException:
        stream.close()
        raise
    return run, counters


def _resume_point(folder: Path, resume_from: str | Path | None, cfg: Config) -> tuple[Path, dict[str, Any]] | None:
    """``runs.resume_point``, refusing a checkpoint past train.iterations before anything is written: the loop
    would not run, and the config, metrics and eval.json would be rewritten for fewer iterations than trained.
    A run exactly at train.iterations goes on (said): only its final evaluation runs, which is how an
    interrupted final evaluation is completed (``emanet study`` resumes a run that has no eval.json)."""
    found = resume_point(folder, resume_from, cfg.to_dict())
    if found is None:
        return None
    reached, wanted = int(found[1]["iteration"]), cfg.train.iterations
    flag = "--resume" if resume_from is None else "--resume-from"
    if reached > wanted:
        raise RunFolderError(
            f"{flag}: the run is already at iteration {reached} ({found[0]}) >= train.iterations={wanted}: "
            f"nothing to train; raise train.iterations above {reached} to continue it (nothing was changed)"
        )
    if reached == wanted:
        logger.warning(
            "%s: the run is already at iteration %d = train.iterations (%s): nothing to train, only the "
            "final evaluation runs again; raise train.iterations to continue training",
            flag,
            reached,
            found[0],
        )
    return found


def _checked_datasets(cfg: Config, env: DistEnv) -> tuple[Dataset, Dataset, list[str], list[list[int]]]:
    """(train set, val set, class names, palette); file lists only, cheap, checked before anything heavy."""
    train_set, val_set = build_datasets(cfg)
    if len(train_set) == 0:  # type: ignore[arg-type]
        raise ConfigError(f"the training split '{cfg.data.train_split}' of {cfg.data.dataset} is empty")
    on_rank0(env, 0, None, lambda: (check_class_count(cfg, train_set, val_set), check_val_files(val_set, cfg)))
    class_names = list(getattr(train_set, "classes", []))
    palette = [list(map(int, c)) for c in getattr(train_set, "palette", [])][: len(class_names)]
    return train_set, val_set, class_names, palette


def _seed_for_init(train: TrainConfig, device: torch.device) -> None:
    if train.deterministic and device.type == "cuda":  # cuBLAS needs this before its first handle
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    seed_everything(train.seed, train.deterministic)


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


def _log_layout(run: TrainRun) -> None:
    cfg, env = run.cfg, run.env
    batch, accum = cfg.train.batch_size, cfg.train.accum_steps
    logger.info(
        "global batch = per-process batch x processes x accumulation = %d x %d x %d = %d",
        batch,
        env.world_size,
        accum,
        batch * env.world_size * accum,
    )
    logger.info(
        "device %s, precision %s, %d batches per epoch and process, run folder %s",
        env.device,
        cfg.train.precision,
        run.stream.per_epoch,
        run.folder,
    )


def _optimizer_and_loss(model: nn.Module, cfg: Config, device: torch.device):
    optim = cfg.optim
    groups = param_groups(model, optim.lr, optim.weight_decay, optim.reference_groups)
    optimizer = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    criterion = SegmentationLoss(
        ignore_index=cfg.loss.ignore_index,
        reduction=cfg.loss.reduction,  # type: ignore[arg-type]
        aux_weight=cfg.loss.aux_weight if cfg.model.aux else 0.0,
    )
    return optimizer, scaler, criterion


def _resume(found, model, optimizer, scaler, cfg: Config, env: DistEnv) -> tuple[Resumed | None, Counters]:
    """Every rank loads the checkpoint rank 0 chose (``found`` on rank 0): what it restored and the counters
    it continues; (None, fresh counters) from scratch if there is none."""
    path = broadcast_object(None if found is None else str(found[0]), env)
    if path is None:
        if env.is_main:
            logger.info("--resume: no checkpoint in %s, starting from scratch", cfg.train.out_dir)
        return None, Counters()
    ckpt = found[1] if found is not None else load_checkpoint(path, required=RESUME_KEYS)
    resumed = restore_training_state(
        ckpt, model, optimizer, scaler, batch_size=cfg.train.batch_size, world_size=env.world_size, rank=env.rank
    )
    if env.is_main and not resumed.exact:
        logger.warning(
            "the checkpoint was written with another batch size or process count; training continues from "
            "its iteration, but will not repeat an uninterrupted run exactly"
        )
    if env.is_main:
        epoch, batch = resumed.position
        logger.info("resumed from %s at iteration %d (epoch %d, batch %d)", path, resumed.iteration, epoch, batch)
    return resumed, Counters(start=resumed.iteration, skipped=resumed.skipped_steps, last_checkpoint=path)


def _build_model(cfg: Config, env: DistEnv) -> tuple[nn.Module, bool]:
    model = build_model(cfg.model).to(env.device)
    if env.distributed and cfg.train.sync_bn:
        if env.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if env.is_main:
                logger.info("BatchNorm -> SyncBatchNorm: statistics over the global batch")
        elif env.is_main:
            logger.warning(
                "train.sync_bn: SyncBatchNorm needs CUDA; each process normalises with its own batch and the "
                "running statistics are averaged over processes after every step"
            )
    return model, any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def _train_loader(train_set: Dataset, cfg: Config, env: DistEnv, folder: Path):
    train = cfg.train
    seeded = PerSampleSeed(skip_bad_samples(train_set, cfg, folder / BAD_SAMPLES), train.seed)
    if not seeded.seeded and env.is_main:
        logger.warning(
            "the training set has no reseed(); augmentation then depends on worker order, and a resumed "
            "run does not repeat an uninterrupted one exactly"
        )
    sampler = ResumableSampler(seeded, num_replicas=env.world_size, rank=env.rank, seed=train.seed)
    loader = DataLoader(
        seeded,
        batch_size=train.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        worker_init_fn=worker_init,
        persistent_workers=cfg.data.num_workers > 0,
        pin_memory=env.device.type == "cuda",
        generator=torch.Generator().manual_seed(train.seed + env.rank),
    )
    if sampler.num_samples < train.batch_size:
        raise ConfigError(
            f"train.batch_size={train.batch_size} is larger than the {sampler.num_samples} training "
            f"samples per process ({env.world_size} process(es))"
        )
    return loader, sampler


def _start_run(run: TrainRun, counters: Counters, resume: bool) -> None:
    """The run starts (rank 0): its layout said, its config, class names and palette written; a resume cuts
    what came after it."""
    _log_layout(run)
    save_config(run.cfg, run.folder / CONFIG)
    if run.class_names:
        write_classes(run.folder, run.class_names, run.palette)
    if resume:
        moved = supersede_checkpoints(run.folder, counters.start, counters.last_checkpoint)
        if moved:
            logger.info("checkpoints after iteration %d moved to %s", counters.start, moved)
        cut = cut_metrics(run.folder, counters.start)
        if cut:
            logger.info(
                "%s cut back to iteration %d: %d later line(s) moved to %s", METRICS, counters.start, cut, METRICS_CUT
            )
