"""Stopping and resuming: exact resume, SIGTERM, non-finite losses (stop and skip)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import Dataset

import emanet.train.loop as engine
import emanet.train.setup as train_setup
from emanet.checkpoint import latest_checkpoint, load_checkpoint
from emanet.cli.main import main
from emanet.config import load_config
from emanet.train.loop import EXIT_INTERRUPTED, EXIT_NONFINITE, TrainingInterrupted, train
from tests.conftest import tiny_run

TINY = tiny_run("train.batch_size=2", "train.log_interval=1", scales="[0.75, 1.25]")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_stopped_and_resumed_run_is_bitwise_equal_to_a_straight_run(tmp_path, caplog):
    # 3 batches per epoch, 2 micro-batches per step: the stop after step 2 falls mid-epoch, workers read ahead
    common = [
        *TINY,
        "data.num_workers=2",
        "train.deterministic=true",
        "train.iterations=3",
        "train.accum_steps=2",
        "train.checkpoint_interval=100",
    ]
    straight = train(load_config(None, [*common, f"train.out_dir={tmp_path / 'a'}"]), progress=False)
    cfg = load_config(None, [*common, f"train.out_dir={tmp_path / 'b'}"])
    with pytest.raises(TrainingInterrupted) as stop:
        train(cfg, progress=False, stop_at=2)
    assert stop.value.exit_code == EXIT_INTERRUPTED and stop.value.iteration == 2
    assert not multiprocessing.active_children()  # the loader's workers (which ignore SIGTERM) were shut down
    mid = load_checkpoint(stop.value.checkpoint)
    assert mid["iteration"] == 2 and mid["data"] == {"epoch": 1, "batches": 1, "batch_size": 2, "world_size": 1}
    with caplog.at_level(logging.INFO, logger="emanet"):
        resumed = train(cfg, resume=True, progress=False)
    assert any("resumed from" in m and "iteration 2 (epoch 1, batch 1)" in m for m in caplog.messages)
    scheduler = load_checkpoint(stop.value.checkpoint)["scheduler"]
    assert scheduler["last_epoch"] == 2  # the schedule's position is in the checkpoint

    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    opt_a = load_checkpoint(latest_checkpoint(tmp_path / "a").path)["optimizer"]["state"]
    opt_b = load_checkpoint(latest_checkpoint(tmp_path / "b").path)["optimizer"]["state"]
    assert all(torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"]) for k in opt_a)

    def losses(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(x["iter"], x["loss"]) for x in lines if x["kind"] == "train"]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # the same data and augmentation at every step
    assert straight["results"]["mIoU"] == resumed["results"]["mIoU"]


def test_sigterm_saves_a_checkpoint_and_exits_with_the_interrupted_status(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "emanet",
        "train",
        "--no-progress",
        *TINY,
        "data.num_workers=1",
        "train.iterations=100000",
        "train.checkpoint_interval=100000",
        f"train.out_dir={run}",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):  # a couple of steps done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, data loader worker included (as torchrun, Slurm do)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    ckpt = load_checkpoint(latest_checkpoint(run).path)
    assert ckpt["iteration"] >= 2 and f"stopped at iteration {ckpt['iteration']} (signal 15)" in err
    assert (run / "latest.txt").read_text().strip() == f"iter_{ckpt['iteration']:07d}.pt"


class NaNFrom(Dataset):
    """Every read number ``first``..``last`` (0-based, in reading order) returns a NaN image."""

    def __init__(self, dataset, first: int, last: int):
        self.dataset, self.first, self.last, self.reads = dataset, first, last, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        if self.first <= self.reads <= self.last:
            image = torch.full_like(image, float("nan"))
        self.reads += 1
        return image, label


def _inject_nan(monkeypatch, first: int, last: int) -> None:
    build = train_setup.build_datasets  # what the training set-up calls
    monkeypatch.setattr(train_setup, "build_datasets", lambda cfg: (NaNFrom(build(cfg)[0], first, last), build(cfg)[1]))


def test_nonfinite_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _inject_nan(monkeypatch, first=4, last=10**9)  # batch 2: reads 4, 5 are step 3
    run = tmp_path / "run"
    status = main(
        ["train", "--no-progress", *TINY, "train.iterations=6", "train.checkpoint_interval=1", f"train.out_dir={run}"]
    )
    assert status == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at iteration 3" in err and "iter_0000002.pt" in err
    assert latest_checkpoint(run).path.name == "iter_0000002.pt" and not (run / "iter_0000003.pt").exists()
    assert all(torch.isfinite(v).all() for v in load_checkpoint(latest_checkpoint(run).path)["model"].values())


def test_skip_mode_drops_the_step_its_bases_update_and_counts_it(tmp_path, monkeypatch):
    _inject_nan(monkeypatch, first=4, last=5)  # step 3 only
    run = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *TINY,
            "train.iterations=4",
            "train.checkpoint_interval=1",
            "train.on_nonfinite=skip",
            "train.keep_checkpoints=0",
            f"train.out_dir={run}",
        ],
    )
    out = train(cfg, progress=False)
    assert out["skipped_steps"] == 1
    assert json.loads((run / "eval.json").read_text())["train"]["skipped_steps"] == 1
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if r["kind"] == "train"] == [0, 0, 1, 1]
    s2, s3, s4 = (load_checkpoint(run / f"iter_000000{i}.pt")["model"] for i in (2, 3, 4))
    assert all(torch.equal(s2[k], s3[k]) for k in s2)  # parameters, EM bases and BN statistics untouched
    assert not torch.equal(s3["head.context.bases"], s4["head.context.bases"])  # the next step trains again
    assert all(torch.isfinite(v).all() for v in s4.values())


def test_skip_mode_gives_up_after_too_many_consecutive_skips(tmp_path, monkeypatch):
    _inject_nan(monkeypatch, first=0, last=10**9)
    cfg = load_config(
        None,
        [
            *TINY,
            "train.iterations=5",
            "train.on_nonfinite=skip",
            "train.max_consecutive_skips=2",
            f"train.out_dir={tmp_path}",
        ],
    )
    with pytest.raises(engine.NonFiniteLoss, match="2 consecutive non-finite losses up to iteration 2"):
        train(cfg, progress=False)
