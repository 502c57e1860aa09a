"""The training loop for any model that returns logits, in one process or under torchrun.

``train(cfg)`` = ``setup`` (train/setup.py: run folder, checked data, model, optimizer, schedule, resumed state
-> ``TrainRun`` and its ``Counters``) -> ``train_iterations``, which reads top to bottom on one screen:

    for each iteration:  micro-batches (autocast forward, loss, backward; DDP syncs gradients on the last one)
                         -> agree (one all-reduce: mean loss, any rank non-finite, each rank's stop signal)
                         -> EMA bases update over the global batch + optimizer step, or _skip_step
                         -> schedule step -> log -> checkpoint -> (stop) -> (evaluate)
    checkpoint:  gather every rank's RNG state and replica digest -> rank 0 writes a TrainingState

Only rank 0 logs and writes files. Evaluation is emanet.evaluation; device and autocast are emanet.runtime.

Exit statuses a caller can return (the CLI's train command does): 0 done, setup.EXIT_USAGE (2) the run
folder, config or a write failed (RunError) or memory ran out (evaluation.OutOfMemory: the batch it tried and
the settings to lower), EXIT_INTERRUPTED (3) stopped by SIGTERM/SIGINT after saving a
checkpoint, EXIT_NONFINITE (4) stopped on a non-finite loss, stops.EXIT_PEER_LOST (5) another torchrun
process is gone (PeerLost: a collective failed; the newest checkpoint is what was saved).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import LRScheduler

from emanet.checkpoint import (
    LATEST,
    TrainingState,
    checkpoint_candidates,
    kept_checkpoints,
    save_checkpoint,
    write_text_atomic,
)
from emanet.config import Config
from emanet.errors import ConfigError, RunFolderError
from emanet.evaluation import OutOfMemory, allocator_said, evaluate, is_out_of_memory, results_to_json
from emanet.runtime import autocast, check_precision
from emanet.train.data import count_bad_samples
from emanet.train.distributed import (
    DistEnv,
    agree,
    average_,
    barrier,
    cleanup_distributed,
    init_distributed,
    replica_states,
)
from emanet.train.log import TrainingLog, check_loggers
from emanet.train.runs import (
    BAD_SAMPLES,
    EVAL,
    describe_checkpoints,
    logged_losses,
    os_reason,
    suspect_reasons,
)
from emanet.train.setup import Counters, TrainingStopped, TrainRun, on_rank0, setup
from emanet.train.stops import PeerLost, StopRequest, StopSignals, peer_failure, peer_lost

logger = logging.getLogger(__name__)

EXIT_INTERRUPTED = 3  # SIGTERM/SIGINT: checkpoint saved at the current step; resume with --resume
EXIT_NONFINITE = 4  # non-finite loss (or too many skipped steps); choose a checkpoint with --resume-from


class TrainingInterrupted(TrainingStopped):
    """A stop signal (or ``stop_at``) ended the run after a checkpoint at the current step."""

    exit_code = EXIT_INTERRUPTED
    signum = 0  # the signal that stopped it (the lowest rank's that got one); 0 for train(stop_at=...)


class NonFiniteLoss(TrainingStopped):
    """A non-finite loss (or too many skipped steps) ended the run."""

    exit_code = EXIT_NONFINITE


def train(
    cfg: Config,
    *,
    resume: bool = False,
    resume_from: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    on_stop: Callable[[TrainingStopped], None] | None = None,
) -> dict[str, Any]:
    """Train as configured, in one process or one of torchrun's; returns the final evaluation and the run folder.

    ``resume``: continue from the newest intact checkpoint of train.out_dir; ``resume_from``: from that
    checkpoint of it (newer ones are moved aside). ``overwrite``: a folder that holds a run is moved aside to
    ``<out_dir>.old-<time>`` instead of refused. ``stop_at``: stop after that iteration exactly as a SIGTERM
    would (checkpoint, then TrainingInterrupted). Raises TrainingInterrupted / NonFiniteLoss / RunError (all
    TrainingStopped, with ``exit_code``) on early stops. ``on_stop`` sees such a stop first, on every rank,
    and the ranks then meet: a caller's rank 0 has reported it before any rank can exit (torchrun stops the
    other workers as soon as one fails).
    """
    cfg.validate()
    check_loggers(cfg)  # a logger asked for and not installed: said before any work
    if overwrite and (resume or resume_from is not None):
        raise ConfigError(
            "--overwrite starts afresh (moving the old run aside), --resume/--resume-from continue it: choose one"
        )
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    env = init_distributed(cfg.train.device)
    counters = Counters()  # setup's replace them; until then a lost peer interrupted the set-up
    try:
        # the signals stay a flag while a stop is said too: torchrun's SIGTERM to the others then cannot cut it
        with StopSignals() as signals:
            try:
                check_precision(env.device, cfg.train.precision)
                with contextlib.ExitStack() as held:
                    resuming = resume or resume_from is not None
                    run, counters = setup(cfg, env, held, resume=resuming, resume_from=resume_from, overwrite=overwrite)
                    held.callback(run.stream.close)  # its workers ignore SIGTERM: they end here, whatever happens
                    log = held.enter_context(TrainingLog(run, counters.start, progress=progress))
                    try:
                        train_iterations(run, counters, StopRequest(signals, stop_at), log)
                    except RuntimeError as e:  # memory: what to lower, no traceback (the CLI's exit 2)
                        if not is_out_of_memory(e):
                            raise
                        raise _out_of_memory(run, counters, e) from None
                    log.close()  # the bar ends before the final evaluation's
                    return _finish(run, counters, log, progress=progress and env.is_main)
            except RuntimeError as e:  # TrainingStopped (raised on every rank alike), or perhaps a lost peer
                stop = _as_stop(e, env, Path(cfg.train.out_dir), counters)
                if stop is None:  # a bug: its traceback
                    raise
                if on_stop is not None:
                    on_stop(stop)
                if not isinstance(stop, PeerLost):  # a lost peer never comes to a meeting
                    barrier(env)
                if stop is e:
                    raise
                raise stop from e
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        cleanup_distributed(env)


def _as_stop(error: RuntimeError, env: DistEnv, folder: Path, counters: Counters) -> TrainingStopped | None:
    """``error`` as an early stop: itself if it is one, a PeerLost for a collective that failed because another
    rank is gone, None for anything else (a bug)."""
    if isinstance(error, TrainingStopped):
        return error
    if not env.distributed or not peer_failure(error):
        return None
    saved = counters.last_checkpoint
    if saved is None and env.is_main:  # lost during set-up: the run folder's newest
        saved = next((str(p) for p in checkpoint_candidates(folder)), None)
    return peer_lost(env, error, step=counters.step, checkpoint=saved)


# ----------------------------------------------------------------------------- the loop


def train_iterations(run: TrainRun, counters: Counters, stop: StopRequest, log: TrainingLog) -> None:
    """The iterations after ``counters.start``, top to bottom: micro-batches -> one vote -> step (or drop it)
    -> schedule -> log -> checkpoint -> (stop) -> (evaluate)."""
    train_cfg, env = run.cfg.train, run.env
    _set_train_mode(run.model, train_cfg.freeze_bn)
    for step in range(counters.start + 1, train_cfg.iterations + 1):
        counters.step = step
        lr = run.scheduler.get_last_lr()[0]  # the first group's (lr_mult 1): optim.lr at this step
        saved_bn = [b.clone() for b in run.bn_buffers] if train_cfg.on_nonfinite == "skip" else []
        loss_sum = torch.zeros((), device=env.device)  # stays on the device: the vote is the step's only host sync
        for micro in range(train_cfg.accum_steps):
            images, labels = (x.to(env.device, non_blocking=True) for x in run.stream.next())
            last = micro == train_cfg.accum_steps - 1  # DDP all-reduces the gradients on the last one only
            with contextlib.nullcontext() if last or not env.distributed else run.net.no_sync():  # type: ignore[operator]
                with autocast(env.device, train_cfg.precision):
                    loss = run.criterion(run.net(images), labels) / train_cfg.accum_steps
                run.scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
            counters.seen += images.shape[0]

        # one all-reduce and one host sync: the summed loss, any rank non-finite, each rank's stop signal (0: none)
        signals = [0.0] * env.world_size
        signals[env.rank] = float(stop.signal())
        vote = torch.cat([torch.stack([loss_sum, (~loss_sum.isfinite()).float()]), loss_sum.new_tensor(signals)])
        total, bad, *asked = agree(vote, env)
        mean_loss = total / env.world_size
        if bad:  # stop, or drop the step with everything it touched
            _skip_step(run, counters, step, mean_loss, saved_bn)
        else:
            counters.consecutive = 0
            for unit in run.units:
                unit.apply_bases_update()  # all-reduced sums and counts: the global batch's mean
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            average_(run.bn_stats, env)
        _advance(run.scheduler, skipped=bool(bad))  # per iteration, a skipped one included
        log.step(step, mean_loss, lr, bool(bad), counters)

        stopping = (any(asked) or stop.reached(step)) and step < train_cfg.iterations
        if step % train_cfg.checkpoint_interval == 0 or step == train_cfg.iterations or stopping:
            counters.last_checkpoint = save_training_checkpoint(run, counters, step, None if bad else mean_loss)
        if stopping:
            interrupted = TrainingInterrupted(
                f"stopped at iteration {step} ({stop.why(asked)}); checkpoint {counters.last_checkpoint}",
                advice="continue with --resume",
                iteration=step,
                checkpoint=counters.last_checkpoint,
                rank=env.rank,
            )
            interrupted.signum = next((int(v) for v in asked if v), 0)
            raise interrupted
        if train_cfg.eval_interval and step % train_cfg.eval_interval == 0 and step != train_cfg.iterations:
            results = evaluate(run.model, run.val_set, run.cfg, env.device, max_images=train_cfg.max_eval_images)
            _set_train_mode(run.model, train_cfg.freeze_bn)
            log.val(step, results)


def _skip_step(run: TrainRun, counters: Counters, step: int, loss: float, saved_bn: list[torch.Tensor]) -> None:
    """A non-finite loss: stop (train.on_nonfinite=stop), or drop the step with everything it touched."""
    train_cfg = run.cfg.train
    if train_cfg.on_nonfinite == "stop":
        raise _diverged(
            run,
            counters,
            f"non-finite loss ({loss}) at iteration {step}: stopped without applying or saving "
            f"this step; newest checkpoint: {counters.last_checkpoint or 'none'}",
            step,
        )
    counters.skipped, counters.consecutive = counters.skipped + 1, counters.consecutive + 1
    run.optimizer.zero_grad(set_to_none=True)
    for unit in run.units:
        unit.discard_pending_update()  # the step's batch estimates never reach the stored bases
    for buffer, saved in zip(run.bn_buffers, saved_bn):
        buffer.copy_(saved)
    if run.scaler.is_enabled():  # fp16 overflow in the forward: back off the scale as AMP would
        run.scaler.update(run.scaler.get_scale() * run.scaler.get_backoff_factor())
    if run.env.is_main:
        logger.warning("iteration %d: non-finite loss, step skipped (%d skipped so far)", step, counters.skipped)
    if train_cfg.max_consecutive_skips and counters.consecutive >= train_cfg.max_consecutive_skips:
        raise _diverged(
            run,
            counters,
            f"{counters.consecutive} consecutive non-finite losses up to iteration {step} "
            f"(train.max_consecutive_skips={train_cfg.max_consecutive_skips}); newest checkpoint: "
            f"{counters.last_checkpoint or 'none'}",
            step,
        )


def _diverged(run: TrainRun, counters: Counters, head: str, step: int) -> NonFiniteLoss:
    kept = kept_checkpoints(run.folder) if run.env.is_main else None  # rank 0 reports; the others carry the head
    listed = describe_checkpoints(run.folder, step, kept) if kept is not None else ""
    return NonFiniteLoss(
        f"{head}\n{listed}\n{_recovery_advice(run, step, kept)}",
        iteration=step,
        checkpoint=counters.last_checkpoint,
        rank=run.env.rank,
    )


def _recovery_advice(run: TrainRun, step: int, kept: list[dict[str, Any]] | None) -> str:
    """What to do after a stop for non-finite losses, fitting the settings (no advice to set what is set) and
    the kept checkpoints (none usable: start over; else the newest one not flagged as suspect)."""
    train_cfg = run.cfg.train
    lower_lr = f"a lower optim.lr (now {run.cfg.optim.lr:g})"
    if train_cfg.on_nonfinite == "stop":
        other = "; or set train.on_nonfinite=skip to drop such steps"
    else:  # skip mode stops only after max_consecutive_skips steps in a row
        n = train_cfg.max_consecutive_skips
        other = f"; or, if the losses recover after a few steps, raise train.max_consecutive_skips (now {n})"
    if kept is None:
        return f"continue from a checkpoint you trust with --resume-from PATH and {lower_lr}{other}"
    usable = [k for k in kept if "error" not in k and k["finite"]]
    if not usable:
        why = "none is kept" if not kept else "each is unreadable or has non-finite weights"
        restart = "start over with --overwrite (the run folder is moved aside)"
        return f"no checkpoint is usable ({why}): {restart} and {lower_lr}{other}"
    reasons = suspect_reasons(kept, step, logged_losses(run.folder))
    trusted = [k for k, why in zip(kept, reasons) if not why]  # suspect_reasons flags unreadable and non-finite
    if trusted:
        pick = f"e.g. the newest one not flagged SUSPECT: --resume-from {trusted[-1]['path']}"
        return f"continue from a checkpoint you trust ({pick}) with {lower_lr}{other}"
    return (
        f"every usable checkpoint is flagged SUSPECT: continue from the oldest (--resume-from {usable[0]['path']}) "
        f"with {lower_lr}, or start over with --overwrite{other}"
    )


# ----------------------------------------------------------------------------- beside the loop


def _out_of_memory(run: TrainRun, counters: Counters, error: BaseException) -> OutOfMemory:
    """What the step tried to hold and which settings lower it (the global batch kept by accumulation)."""
    t, d, env = run.cfg.train, run.cfg.data, run.env
    total = t.batch_size * env.world_size * t.accum_steps
    lower = []
    if t.batch_size > 1:
        smaller = max(k for k in range(1, t.batch_size) if t.batch_size % k == 0)  # the same images per step
        steps = t.accum_steps * t.batch_size // smaller
        lower.append(
            f"train.batch_size with train.accum_steps raised to keep the global batch of {total} "
            f"(e.g. train.batch_size={smaller} train.accum_steps={steps})"
        )
    lower.append(f"data.crop_size (now {d.crop_size})")
    if t.precision == "fp32":
        lower.append("train.precision=bf16 (fp16 on CUDA)")
    on_cpu = " The paper-scale recipes are meant for GPUs." if env.device.type == "cpu" else ""
    return OutOfMemory(
        f"out of memory at iteration {counters.step} on {env.device}: a micro-batch of {t.batch_size} image(s) of "
        f"{d.crop_size}x{d.crop_size} in {t.precision} did not fit ({allocator_said(error)}). Lower what a step "
        f"holds: {'; or '.join(lower)}. Newest checkpoint: {counters.last_checkpoint or 'none'}.{on_cpu}"
    )


def _advance(scheduler: LRScheduler, *, skipped: bool) -> None:
    if not skipped:
        scheduler.step()
        return
    with warnings.catch_warnings():  # torch warns when a first step has no optimizer step: ours is skipped on purpose
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
        scheduler.step()


def _set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:  # running statistics used as constants, never updated
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def save_training_checkpoint(run: TrainRun, counters: Counters, step: int, loss: float | None) -> str | None:
    """Every rank contributes its RNG state and a digest of its replica; rank 0 writes. Nobody leaves (or
    exits) before the file is complete, and a failed save stops every rank."""
    rngs, digests = replica_states(run.model, run.env)

    def save() -> str:
        assert rngs is not None and digests is not None
        if any(d != digests[0] for d in digests):
            differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
            logger.warning("at iteration %d the replicas of ranks %s differ from rank 0's", step, differing)
        state = TrainingState(
            model=run.model.state_dict(),
            optimizer=run.optimizer.state_dict(),
            scheduler=run.scheduler.state_dict(),
            scaler=run.scaler.state_dict(),
            iteration=step,
            config=run.cfg.to_dict(),
            rng=rngs,
            data=run.stream.state_dict(),
            skipped_steps=counters.skipped,
            replicas=digests,
            loss=loss,
            class_names=run.class_names,
            palette=run.palette,
        )
        try:
            return str(save_checkpoint(state.to_dict(), run.folder, step, keep=run.cfg.train.keep_checkpoints))
        except OSError as e:
            raise RunFolderError(
                f"cannot write the checkpoint of iteration {step}: {os_reason(e)}; the previous "
                f"checkpoint ({counters.last_checkpoint or 'none'}) and {LATEST} are unchanged. Free space "
                "or fix the folder, then continue with --resume"
            ) from None

    return on_rank0(run.env, step, counters.last_checkpoint, save)


def _finish(run: TrainRun, counters: Counters, log: TrainingLog, *, progress: bool) -> dict[str, Any]:
    """The final evaluation, eval.json and the summary."""
    cfg, folder = run.cfg, run.folder
    results = evaluate(
        run.model, run.val_set, cfg, run.env.device, max_images=cfg.train.max_eval_images, progress=progress
    )
    results = results_to_json(results)
    barrier(run.env)  # every rank's bad-sample lines are written
    summary = {
        "iterations": cfg.train.iterations,
        "skipped_steps": counters.skipped,
        "bad_samples": count_bad_samples(folder / BAD_SAMPLES),
        "bad_val_files": len(results.get("skipped_files", [])),
    }
    log.write(
        {"kind": "val", "iter": cfg.train.iterations, "mIoU": results["mIoU"], "aAcc": results["aAcc"], **summary}
    )
    if run.env.is_main:
        write_text_atomic(folder / EVAL, json.dumps({**results, "train": summary}, indent=2))
        _report_dropped(folder, summary, results)
    return {
        "run": str(folder),
        "results": results,
        "class_names": list(getattr(run.val_set, "classes", [])),
        "model": run.model,
        "rank": run.env.rank,
        "world_size": run.env.world_size,
        **summary,
    }


def _report_dropped(folder: Path, summary: dict[str, int], results: dict[str, Any]) -> None:
    """What the run left out: skipped steps, bad training files, bad validation files."""
    if summary["skipped_steps"]:
        logger.warning("%d step(s) skipped for non-finite losses", summary["skipped_steps"])
    if summary["bad_samples"]:
        logger.warning("%d bad training file(s) skipped; listed in %s", summary["bad_samples"], folder / BAD_SAMPLES)
    if summary["bad_val_files"]:
        logger.warning(
            "%d bad validation file(s) left out of evaluation; listed in %s (skipped_files):\n  %s",
            summary["bad_val_files"],
            folder / EVAL,
            "\n  ".join(results["skipped_files"]),
        )
