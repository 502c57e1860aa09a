"""The training loop for any model that returns logits, in one process or under torchrun.

``train(cfg)`` = ``setup`` (train_setup.py: run folder, checked data, model, optimizer, resumed state ->
``TrainRun``) -> ``_loop``, which reads on one screen:

    for each step:  lr (poly) -> train_step -> log -> checkpoint -> (stop) -> evaluate
    train_step:     micro-batches (autocast forward, loss, backward; DDP syncs gradients on the last one)
                    -> agree (one all-reduce: mean loss, any rank non-finite, any rank asked to stop)
                    -> EMA bases update over the global batch + optimizer step, or _skip_step
    checkpoint:     gather every rank's RNG state and replica digest -> rank 0 writes training_state

Only rank 0 logs and writes files. Evaluation is evaluation.py; device and autocast are runtime.py.

Exit statuses a caller can return (cli.cmd_train does): 0 done, EXIT_USAGE (2) the run folder, config or a
write failed (RunError), EXIT_INTERRUPTED (3) stopped by SIGTERM/SIGINT after saving a checkpoint,
EXIT_NONFINITE (4) stopped on a non-finite loss.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from emanet.checkpoint import kept_checkpoints, save_checkpoint, training_state
from emanet.config import Config
from emanet.evaluation import evaluate, results_to_json
from emanet.models.em import EMAUnit
from emanet.progress import progress_bar
from emanet.runtime import autocast, check_precision, select_device
from emanet.train.data import build_datasets, count_bad_samples
from emanet.train.distributed import (
    StopSignals,
    agree,
    average_,
    barrier,
    cleanup_distributed,
    init_distributed,
    replica_states,
)
from emanet.train.runs import RunFolderError, describe_checkpoints, os_reason
from emanet.train.setup import (
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_USAGE,
    NonFiniteLoss,
    RunError,
    TrainingInterrupted,
    TrainingStopped,
    TrainRun,
    on_rank0,
    param_groups,
    poly_factor,
    setup,
)

Log = Callable[[str], None]

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_NONFINITE",
    "EXIT_USAGE",
    "NonFiniteLoss",
    "RunError",
    "TrainingInterrupted",
    "TrainingStopped",
    "autocast",
    "build_datasets",
    "evaluate",
    "param_groups",
    "poly_factor",
    "results_to_json",
    "select_device",
    "train",
]


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
    cfg: Config,
    *,
    resume: bool = False,
    resume_from: str | Path | None = None,
    overwrite: bool = False,
    log: Log = print,
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
    if overwrite and (resume or resume_from is not None):
        raise ValueError(
            "--overwrite starts afresh (moving the old run aside), --resume/--resume-from continue it: choose one"
        )
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    env = init_distributed(cfg.train.device)
    log = log if env.is_main else (lambda _: None)
    try:
        check_precision(env.device, cfg.train.precision)
        with StopSignals() as signals, contextlib.ExitStack() as held:
            r = setup(
                cfg,
                env,
                held,
                resume=resume or resume_from is not None,
                resume_from=resume_from,
                overwrite=overwrite,
                log=log,
            )
            try:
                return _loop(r, signals, stop_at, progress=progress and env.is_main)
            finally:
                r.stream.close()
    except TrainingStopped as e:  # raised on every rank alike: agreed by the step's vote or broadcast
        if on_stop is not None:
            on_stop(e)
        barrier(env)
        raise
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        cleanup_distributed(env)


# ----------------------------------------------------------------------------- the loop


def _loop(r: TrainRun, signals: StopSignals, stop_at: int | None, *, progress: bool) -> dict[str, Any]:
    """lr -> step -> log -> checkpoint -> (stop) -> evaluate, then the final evaluation."""
    cfg, t, o = r.cfg, r.cfg.train, r.cfg.optim
    metrics = MetricsLog(r.folder) if r.env.is_main else None
    # a bar on a terminal; in a log file a plain line every log_interval iterations
    bar = (
        progress_bar(total=t.iterations, initial=r.start, desc="train", unit="it", every=t.log_interval)
        if progress
        else None
    )
    _set_train_mode(r.model, t.freeze_bn)
    t0 = time.perf_counter()

    def stop_requested(step: int) -> bool:
        return signals.requested or (stop_at is not None and step >= stop_at)

    try:
        for it in range(r.start, t.iterations):
            step = it + 1
            lr = o.lr * poly_factor(it, t.iterations, o.power, o.warmup_iters)
            for g in r.optimizer.param_groups:
                g["lr"] = lr * g["lr_mult"]
            loss, bad, stop = train_step(r, step, stop_requested)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", skipped=r.skipped)
            if metrics is not None and (step % t.log_interval == 0 or step == t.iterations or bad):
                images_per_s = r.seen * r.env.world_size / max(time.perf_counter() - t0, 1e-9)
                metrics.write(
                    {
                        "kind": "train",
                        "iter": step,
                        "loss": None if bad else loss,
                        "lr": lr,
                        "skipped": r.skipped,
                        "images_per_s": images_per_s,
                    }
                )
            stopping = stop and step < t.iterations
            if step % t.checkpoint_interval == 0 or step == t.iterations or stopping:
                r.last_ckpt = save_training_checkpoint(r, step, None if bad else loss)
            if stopping:
                why = f"signal {signals.received}" if signals.requested else "stop_at"
                message = f"stopped at iteration {step} ({why}); checkpoint {r.last_ckpt}; continue with --resume"
                raise TrainingInterrupted(message, iteration=step, checkpoint=r.last_ckpt, rank=r.env.rank)
            if t.eval_interval and step % t.eval_interval == 0 and step != t.iterations:
                res = evaluate(r.model, r.val_set, cfg, r.env.device, max_images=t.max_eval_images)
                _set_train_mode(r.model, t.freeze_bn)
                if metrics is not None:
                    metrics.write({"kind": "val", "iter": step, "mIoU": float(res["mIoU"]), "aAcc": float(res["aAcc"])})
                r.log(f"iter {step}: val mIoU {100 * float(res['mIoU']):.2f}")
        if bar is not None:
            bar.close()
            bar = None
        return _finish(r, metrics, progress)
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()


def train_step(r: TrainRun, step: int, stop_requested: Callable[[int], bool]) -> tuple[float, bool, bool]:
    """One optimizer step over ``accum_steps`` micro-batches; returns (mean loss over ranks, skipped, stop).

    DDP all-reduces gradients on the last micro-batch only. One all-reduce then agrees on the mean loss, any
    rank's non-finite loss and any rank's stop request; a non-finite step is dropped or stops the run.
    """
    t, env = r.cfg.train, r.env
    saved_bn = [b.clone() for b in r.bn_buffers] if t.on_nonfinite == "skip" else None
    loss_sum = torch.zeros((), device=env.device)  # stays on the device: the vote is the step's only host sync
    for micro in range(t.accum_steps):
        images, labels = r.stream.next()
        images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
        last = micro == t.accum_steps - 1
        with contextlib.nullcontext() if last or not env.distributed else r.net.no_sync():  # type: ignore[operator]
            with autocast(env.device, t.precision):
                loss = r.criterion(r.net(images), labels) / t.accum_steps
            r.scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
        r.seen += images.shape[0]
    vote = torch.stack([loss_sum, (~loss_sum.isfinite()).float(), loss_sum.new_tensor(float(stop_requested(step)))])
    total, bad, votes = agree(vote, env)  # one all-reduce and one host sync: mean loss, non-finite, stop
    loss_mean = total / env.world_size
    if bad:
        _skip_step(r, step, loss_mean, saved_bn or [])
    else:
        r.consecutive = 0
        for unit in r.units:
            unit.apply_bases_update()  # all-reduced sums and counts: the global batch's mean
        r.scaler.step(r.optimizer)
        r.scaler.update()
        r.optimizer.zero_grad(set_to_none=True)
        average_(r.bn_stats, env)
    return loss_mean, bool(bad), votes > 0


def _skip_step(r: TrainRun, step: int, loss: float, saved_bn: list[torch.Tensor]) -> None:
    """A non-finite loss: stop (train.on_nonfinite=stop), or drop the step with everything it touched."""
    t = r.cfg.train
    if t.on_nonfinite == "stop":
        raise _diverged(
            r,
            f"non-finite loss ({loss}) at iteration {step}: stopped without applying or saving "
            f"this step; newest checkpoint: {r.last_ckpt or 'none'}",
            step,
        )
    r.skipped, r.consecutive = r.skipped + 1, r.consecutive + 1
    r.optimizer.zero_grad(set_to_none=True)
    _discard_bases_update(r.units)
    for b, saved in zip(r.bn_buffers, saved_bn):
        b.copy_(saved)
    if r.scaler.is_enabled():  # fp16 overflow in the forward: back off the scale as AMP would
        r.scaler.update(r.scaler.get_scale() * r.scaler.get_backoff_factor())
    r.log(f"iteration {step}: non-finite loss, step skipped ({r.skipped} skipped so far)")
    if t.max_consecutive_skips and r.consecutive >= t.max_consecutive_skips:
        raise _diverged(
            r,
            f"{r.consecutive} consecutive non-finite losses up to iteration {step} "
            f"(train.max_consecutive_skips={t.max_consecutive_skips}); newest checkpoint: "
            f"{r.last_ckpt or 'none'}",
            step,
        )


def _diverged(r: TrainRun, head: str, step: int) -> NonFiniteLoss:
    kept = describe_checkpoints(r.folder, step, kept_checkpoints(r.folder)) if r.env.is_main else ""
    return NonFiniteLoss(
        f"{head}\n{kept}\ncontinue from a checkpoint you trust with --resume-from PATH (e.g. "
        "with a lower optim.lr), or set train.on_nonfinite=skip to drop such steps",
        iteration=step,
        checkpoint=r.last_ckpt,
        rank=r.env.rank,
    )


def save_training_checkpoint(r: TrainRun, step: int, loss: float | None) -> str | None:
    """Every rank contributes its RNG state and a digest of its replica; rank 0 writes. Nobody leaves (or
    exits) before the file is complete, and a failed save stops every rank."""
    cfg, env, o = r.cfg, r.env, r.cfg.optim
    rngs, digests = replica_states(r.model, env)

    def save() -> str:
        assert rngs is not None and digests is not None
        if any(d != digests[0] for d in digests):
            bad = [rank for rank, d in enumerate(digests) if d != digests[0]]
            r.log(f"warning: at iteration {step} the replicas of ranks {bad} differ from rank 0's")
        schedule = {
            "kind": "poly",
            "base_lr": o.lr,
            "power": o.power,
            "warmup": o.warmup_iters,
            "total": cfg.train.iterations,
        }
        state = training_state(
            model=r.model.state_dict(),
            optimizer=r.optimizer.state_dict(),
            scaler=r.scaler.state_dict(),
            iteration=step,
            config=cfg.to_dict(),
            schedule=schedule,
            rng=rngs,
            data=r.stream.state_dict(),
            skipped_steps=r.skipped,
            replicas=digests,
            loss=loss,
            class_names=r.class_names,
            palette=r.palette,
        )
        try:
            return str(save_checkpoint(state, r.folder, step, keep=cfg.train.keep_checkpoints))
        except OSError as e:
            raise RunFolderError(
                f"cannot write the checkpoint of iteration {step}: {os_reason(e)}; the previous "
                f"checkpoint ({r.last_ckpt or 'none'}) and latest.txt are unchanged. Free space "
                "or fix the folder, then continue with --resume"
            ) from None

    return on_rank0(env, step, r.last_ckpt, save)


def _finish(r: TrainRun, metrics: MetricsLog | None, progress: bool) -> dict[str, Any]:
    """The final evaluation, eval.json and the summary."""
    cfg, run = r.cfg, r.folder
    results = evaluate(r.model, r.val_set, cfg, r.env.device, max_images=cfg.train.max_eval_images, progress=progress)
    results = results_to_json(results)
    barrier(r.env)  # every rank's bad-sample lines are written
    summary = {
        "iterations": cfg.train.iterations,
        "skipped_steps": r.skipped,
        "bad_samples": count_bad_samples(run / "bad_samples.txt"),
        "bad_val_files": len(results.get("skipped_files", [])),
    }
    if metrics is not None:
        metrics.write(
            {"kind": "val", "iter": cfg.train.iterations, "mIoU": results["mIoU"], "aAcc": results["aAcc"], **summary}
        )
        (run / "eval.json").write_text(json.dumps({**results, "train": summary}, indent=2))
    if r.skipped:
        r.log(f"{r.skipped} step(s) skipped for non-finite losses")
    if summary["bad_samples"]:
        r.log(f"{summary['bad_samples']} bad training file(s) skipped; listed in {run / 'bad_samples.txt'}")
    if summary["bad_val_files"]:
        r.log(
            f"{summary['bad_val_files']} bad validation file(s) left out of evaluation; listed in "
            f"{run / 'eval.json'} (skipped_files):\n  " + "\n  ".join(results["skipped_files"])
        )
    return {
        "run": str(run),
        "results": results,
        "class_names": list(getattr(r.val_set, "classes", [])),
        "model": r.model,
        "rank": r.env.rank,
        "world_size": r.env.world_size,
        **summary,
    }
