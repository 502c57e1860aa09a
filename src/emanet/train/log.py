"""What a training run records as it goes, on rank 0 only: metrics.jsonl, TensorBoard scalars when
tensorboard is installed, and a progress bar (on a terminal; in a log file a plain line every log_interval)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from emanet.progress import progress_bar
from emanet.train.runs import METRICS
from emanet.train.setup import Counters, TrainRun

logger = logging.getLogger(__name__)


class TrainingLog:
    """What a run records as it goes, on rank 0 only: metrics.jsonl, TensorBoard scalars when tensorboard is
    installed, and a progress bar (on a terminal; in a log file a plain line every log_interval iterations)."""

    def __init__(self, run: TrainRun, start: int, *, progress: bool):
        train_cfg, main = run.cfg.train, run.env.is_main
        self.run, self.started = run, time.perf_counter()
        self.path = run.folder / METRICS if main else None
        self.tb = self.bar = None
        if progress and main:
            every = train_cfg.log_interval
            self.bar = progress_bar(total=train_cfg.iterations, initial=start, desc="train", unit="it", every=every)
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.folder / "tb"))
            except ImportError:  # optional extra
                pass

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
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "iter" and isinstance(v, int | float) and v is not None:
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["iter"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        if self.tb is not None:
            self.tb.close()
