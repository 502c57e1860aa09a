"""Progress output: plain lines in logs (no carriage returns), a tqdm bar on a terminal."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import emanet.progress
from emanet.config import Config
from emanet.evaluation import evaluate
from emanet.progress import LINES_PER_RUN, LineProgress, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_line_progress_prints_every_n_steps_and_the_end():
    out = io.StringIO()
    bar = progress_bar(total=95, desc="train", unit="it", every=10, stream=out)
    assert isinstance(bar, LineProgress)
    for step in range(95):
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")  # as the training loop does: values, then the step
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [re.match(r"train: (\d+)/95 it", line).group(1) for line in lines] == [
        str(n) for n in (*range(10, 91, 10), 95)
    ]
    assert lines[0].endswith("loss=0.100") and "eta" in lines[0] and "eta" not in lines[-1]


def test_line_progress_default_interval_and_an_early_stop():
    out = io.StringIO()
    bar = LineProgress(1000, desc="eval", unit="img", initial=100, stream=out)
    assert bar.every == 45  # about LINES_PER_RUN = 20 lines for the 900 steps left
    bar.update(37)
    bar.close()  # stopped early: the last position is still reported, once
    bar.close()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("eval: 137/1000 img (14%)")


class Clock:
    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_line_shows_the_figures_set_before_its_update():
    out = io.StringIO()
    bar = LineProgress(4, desc="train", unit="it", every=1, stream=out)
    for step in range(1, 5):
        bar.set_postfix(step=step)
        bar.update(1)
    assert [line.rsplit("step=", 1)[1] for line in out.getvalue().splitlines()] == ["1", "2", "3", "4"]


@pytest.mark.parametrize("seconds_per_step, most", [(10.0, LINES_PER_RUN + 1), (0.001, 1)])
def test_a_default_bar_prints_a_bounded_number_of_lines(seconds_per_step, most):
    out = io.StringIO()
    bar = LineProgress(1000, desc="eval", unit="img", stream=out, clock=Clock(seconds_per_step))
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert 1 <= len(lines) <= most and lines[-1].startswith("eval: 1000/1000 img")
    if most == 1:  # a job of a second: its last line only, not one per sample
        assert len(lines) == 1


def test_an_explicit_interval_is_kept_however_fast_the_steps():
    out = io.StringIO()
    bar = LineProgress(6, desc="train", unit="it", every=2, stream=out, clock=Clock(0.001))
    for _ in range(6):
        bar.update(1)
    assert re.findall(r"train: (\d)/6", out.getvalue()) == ["2", "4", "6"]


class Pixels(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 300

    def __getitem__(self, i):
        return torch.rand(3, 5, 7), torch.randint(0, 3, (5, 7))


def test_an_evaluation_of_many_images_prints_at_most_about_twenty_lines(monkeypatch, capsys):
    monkeypatch.setattr(emanet.progress, "MIN_SECONDS", 0.0)  # as if each image took long: only the count limits
    cfg = Config()
    cfg.model.num_classes = 3
    evaluate(nn.Conv2d(3, 3, 1), Pixels(), cfg, torch.device("cpu"), progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert 10 <= len(lines) <= LINES_PER_RUN + 1 and lines[-1].startswith("eval: 300/300 img")


def test_terminal_gets_a_tqdm_bar():
    out = FakeTerminal()
    bar = progress_bar(total=5, desc="predict", unit="img", stream=out)
    assert not isinstance(bar, LineProgress)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert "\r" in out.getvalue() and "predict" in out.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`emanet train` on the toy synthetic recipe, stderr captured like a batch job's log file."""
    root = tmp_path_factory.mktemp("progress")
    log = root / "train.log"
    args = [
        "--config",
        "synthetic_toy",
        "train.iterations=6",
        "train.batch_size=2",
        "train.log_interval=3",
        "train.checkpoint_interval=6",
        "data.options.length=12",
        "data.options.val_length=3",
        "data.options.image_size=48",
        "data.options.min_objects=2",
        "data.options.max_objects=4",
        "data.crop_size=48",
        f"train.out_dir={root / 'run'}",
    ]
    with open(log, "w") as f:
        r = subprocess.run(
            [sys.executable, "-m", "emanet", "train", *args], stdout=subprocess.PIPE, stderr=f, text=True, timeout=300
        )
    assert r.returncode == 0, log.read_text()
    return root, log.read_text()


def test_train_and_eval_write_plain_lines_into_a_log(tiny_run):
    _, text = tiny_run
    assert "\r" not in text
    assert re.findall(r"^train: (\d+)/6 it", text, flags=re.M) == ["3", "6"]  # every train.log_interval
    assert re.search(r"^eval: 3/3 img \(100%\)", text, flags=re.M)


def test_each_train_line_shows_its_own_iterations_loss_and_lr(tiny_run):
    root, text = tiny_run
    printed = {
        int(m[0]): (m[1], m[2]) for m in re.findall(r"^train: (\d+)/6 it.*loss=(\S+) lr=(\S+)", text, flags=re.M)
    }
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["iter"]: (f"{r['loss']:.4f}", f"{r['lr']:.2e}") for r in records if r["kind"] == "train"}
    # the poly schedule changes lr every step: a line showing the previous step's figures differs
    assert sorted(printed) == [3, 6] and {i: logged[i] for i in printed} == printed


def test_predict_writes_plain_lines_into_a_log(tiny_run, tmp_path):
    root, _ = tiny_run
    for i in range(2):
        Image.fromarray(np.full((40, 44, 3), 60 * i, np.uint8)).save(tmp_path / f"img{i}.png")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "emanet",
            "predict",
            str(root / "run"),
            str(tmp_path / "img0.png"),
            str(tmp_path / "img1.png"),
            "--out",
            str(tmp_path / "pred"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and re.search(r"^predict: 2/2 img", r.stderr, flags=re.M)
    assert (tmp_path / "pred" / "img1.png").is_file()
