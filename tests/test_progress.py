"""Progress output: plain lines in logs (no carriage returns), a tqdm bar on a terminal."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from emanet.progress import LineProgress, progress_bar


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
    assert bar.every == 50  # about LINES_PER_RUN = 20 lines for the whole run
    bar.update(37)
    bar.close()  # stopped early: the last position is still reported, once
    bar.close()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("eval: 137/1000 img (14%)")


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
