"""What a training run records as it goes, on rank 0 only: metrics.jsonl always, the scalars of metrics.jsonl
also to the loggers train.loggers names (TensorBoard under tb/, Weights & Biases), and a progress bar (on a
terminal; in a log file a plain line every log_interval iterations, showing that iteration's figures)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from emanet.config import Config
from emanet.errors import MissingExtra, install_hint
from emanet.progress import progress_bar
from emanet.train.runs import METRICS
from emanet.train.setup import Counters, TrainRun

logger = logging.getLogger(__name__)


class LoggerUnavailable(Exception):
    """A logger that is installed but cannot start (wandb not logged in): the run goes on without it, said once.
    By then the run folder holds the run, so stopping would leave a folder that refuses a plain rerun."""


class TensorBoard:
    """Scalars under ``<run>/tb`` (the tensorboard extra)."""

    def __init__(self, folder: Path, cfg: Config):
        from torch.utils.tensorboard import SummaryWriter  # optional: emanet[tensorboard]

        self.writer = SummaryWriter(str(folder / "tb"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run named after the run folder, its files under ``<run>/wandb`` unless WANDB_DIR is set;
    project "emanet" unless WANDB_PROJECT is set; WANDB_MODE=offline logs without a network (wandb sync later)."""

    def __init__(self, folder: Path, cfg: Config):
        import wandb  # optional: emanet[wandb]

        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "emanet",
                name=folder.name,
                dir=None if os.environ.get("WANDB_DIR") else str(folder),
                config=cfg.to_dict(),
                settings=wandb.Settings(console="off"),  # our stderr stays ours: no redirection, the bar unchanged
            )
        except wandb.errors.Error as e:  # not logged in, a bad entity or project: said by _open_loggers
            raise LoggerUnavailable(
                f"wandb could not start a run: {e} (log in with `wandb login`, or set WANDB_MODE=offline to log "
                "locally and `wandb sync` later)"
            ) from None

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


# a writer for each value of config.Logger (tests/train/test_log.py holds them equal); each needs the module and
# the extra of its own name
LOGGERS: dict[str, type] = {"tensorboard": TensorBoard, "wandb": WandB}


def check_loggers(cfg: Config) -> None:
    """Before any work: wandb asked for and not installed is an error naming the extra (the dashboard is what
    the user came for); a missing tensorboard is one warning when the run starts (TrainingLog)."""
    if "wandb" in cfg.train.loggers and importlib.util.find_spec("wandb") is None:
        raise MissingExtra(
            f"train.loggers has wandb, but wandb is not installed: {install_hint('wandb')}; or leave wandb out "
            "of train.loggers"
        )


def _open_loggers(run: TrainRun) -> list[Any]:
    opened = []
    for name in dict.fromkeys(run.cfg.train.loggers):  # each once, in the order given
        if importlib.util.find_spec(name) is None:
            logger.warning(
                "train.loggers has %s, but %s is not installed: this run logs to %s only; install it with %s",
                name,
                name,
                METRICS,
                install_hint(name),
            )
            continue
        try:
            opened.append(LOGGERS[name](run.folder, run.cfg))
        except LoggerUnavailable as e:
            logger.warning("train.loggers has %s, but %s; this run logs to %s only", name, e, METRICS)
    return opened


class TrainingLog:
    """What a run records as it goes, on rank 0 only: metrics.jsonl, the same scalars to train.loggers, and a
    progress bar (on a terminal; in a log file a plain line every log_interval iterations)."""

    def __init__(self, run: TrainRun, start: int, *, progress: bool):
        train_cfg, main = run.cfg.train, run.env.is_main
        self.run, self.started = run, time.perf_counter()
        self.path = run.folder / METRICS if main else None
        self.bar = None
        self.loggers = _open_loggers(run) if main else []
        if progress and main:
            every = train_cfg.log_interval
            self.bar = progress_bar(total=train_cfg.iterations, initial=start, desc="train", unit="it", every=every)

    def step(self, step: int, loss: float, lr: float, bad: bool, counters: Counters) -> None:
        train_cfg = self.run.cfg.train
        if self.bar is not None:  # this step's figures first: the line that update() prints shows them
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", skipped=counters.skipped, refresh=False)
            self.bar.update(1)
        if step % train_cfg.log_interval == 0 or step == train_cfg.iterations or bad:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            images_per_s = counters.seen * self.run.env.world_size / elapsed
            loss_or_none = None if bad else loss
            record = {"kind": "train", "iter": step, "loss": loss_or_none, "lr": lr, "skipped": counters.skipped}
            self.write({**record, "images_per_s": images_per_s})

    def val(self, step: int, results: dict[str, Any]) -> None:
        self.write({"kind": "val", "iter": step, "mIoU": float(results["mIoU"]), "aAcc": float(results["aAcc"])})
        if self.run.env.is_main:
            logger.info("iter %d: val mIoU %.2f", step, 100 * float(results["mIoU"]))

    def write(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl; its numbers, as ``kind/key``, to every logger at step ``iter``."""
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        kind = record.get("kind", "train")
        scalars = {
            f"{kind}/{k}": v
            for k, v in record.items()
            if k not in ("iter", "kind") and isinstance(v, int | float) and not isinstance(v, bool)
        }
        for sink in self.loggers:
            sink.scalars(scalars, record["iter"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        for sink in self.loggers:
            sink.close()
        self.loggers = []
