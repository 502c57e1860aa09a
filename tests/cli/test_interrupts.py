"""One interrupt policy for every command, as a user meets it: SIGINT (Ctrl-C) or SIGTERM sent to the process
group of a running `emanet` ends it with one line naming the command and the signal, no traceback, exit 130
(3 where a rerun continues what was saved: study), every earlier file byte-identical and no temporary left.
And an override written without `=` is explained before any work."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emanet.cli.main import main
from tests.conftest import run_cli, tiny_run

TINY = tiny_run("train.batch_size=2", length=4, val_length=1)
# a validation split long enough that a signal always lands while eval is still working
LONG_VAL = "data.options={length: 4, val_length: 3000, image_size: 32, max_objects: 6, min_objects: 2}"

pytestmark = pytest.mark.usefixtures("one_thread")


class Running:
    """`python -m emanet ARGS` in its own process group; its stderr read as it comes (a thread)."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emanet", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a group of its own: the signal goes to it as a terminal's Ctrl-C would
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(self.lines)):
            assert self.proc.poll() is None, f"ended before {text!r}:\n" + "".join(self.lines)[-3000:]
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n" + "".join(self.lines)[-3000:]
            time.sleep(0.05)

    def wait_until(self, done, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert self.proc.poll() is None, f"ended before {what}:\n" + "".join(self.lines)[-3000:]
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n" + "".join(self.lines)[-3000:]
            time.sleep(0.02)

    def signal(self, signum: int) -> tuple[int, str, str]:
        os.killpg(self.proc.pid, signum)
        out = self.proc.stdout.read()
        code = self.proc.wait(timeout=120)
        self.reader.join(timeout=30)
        return code, out, "".join(self.lines)


def digests(*folders: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in f.rglob("*") if p.is_file()}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".emanet-probe")]


def said_once(err: str, command: str, signame: str) -> None:
    """Exactly one line about the stop, naming the command and the signal; no traceback."""
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"emanet {command}:")]
    assert len(lines) == 1 and f"interrupted by {signame}" in lines[0], err[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--no-progress", *TINY, "train.iterations=1", f"train.out_dir={run}"]) == 0
    return run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_eval_is_one_line_and_130_and_writes_nothing(trained, tmp_path, signum):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier file beside --out\n")
    before = digests(trained, out)
    running = Running("eval", str(trained), LONG_VAL, "--out", str(out / "eval.json"))
    running.wait_for("eval: ")  # the evaluation's first progress line: it is working
    code, stdout, err = running.signal(signum)
    assert code == 130, err[-3000:]
    said_once(err, "eval", signal.Signals(signum).name)
    assert not (out / "eval.json").exists() and "written:" not in stdout
    assert digests(trained, out) == before and temporaries(tmp_path) == [] and temporaries(trained) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_predict_is_one_line_and_130_and_leaves_only_complete_files(trained, tmp_path, signum):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(inputs / f"{i:03d}.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier file in --out\n")
    before = digests(trained, inputs, out)
    running = Running("predict", str(trained), str(inputs), "--out", str(out), "--device", "cpu")
    # the first written label: some images are done, the others are not (a progress line may come only after
    # seconds, progress.py bounds how many a bar prints)
    running.wait_until(lambda: [p for p in out.glob("*.png") if ".tmp" not in p.name], "a written prediction")
    code, _, err = running.signal(signum)
    assert code == 130, err[-3000:]
    said_once(err, "predict", signal.Signals(signum).name)
    after = digests(trained, inputs, out)
    assert {p: after[p] for p in before} == before and temporaries(tmp_path) == []
    written = [p for p in out.rglob("*.png")]
    assert 0 < len(written) < 3 * 300  # stopped part-way
    for path in written:  # every file under its own name is complete
        with Image.open(path) as image:
            image.load()


@pytest.mark.slow
def test_ctrl_c_during_study_exits_3_and_the_same_command_continues(tmp_path):
    out = tmp_path / "study"
    variant = [*TINY, "train.iterations=200", "train.checkpoint_interval=50", "train.log_interval=1"]
    study = ["study", "iterations", "--config", "synthetic_toy", *variant, "--out", str(out), "--no-progress"]
    study += ["--train-stages", "1", "--eval-stages", "1,2"]
    running = Running(*study)
    running.wait_for("device cpu")  # the variant's training has started
    code, _, err = running.signal(signal.SIGINT)
    assert code == 3, err[-3000:]
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("emanet study:")]
    assert "(signal 2)" in line and "run the same command again to continue" in line and "--resume" not in line
    checkpoint = (out / "runs" / "T1" / "latest.txt").read_text().strip()

    again = run_cli(*study)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'runs' / 'T1' / checkpoint}" in again.stderr
    assert "| T_train \\ T_eval | 1 | 2 |" in again.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "RUN", "--device", "cpu"],
        ["demo", "--out", "OUT/demo"],
        ["study", "iterations", "--out", "OUT/study", "--train-stages", "1"],
        ["check-data", "--config", "synthetic_toy", "data.num_workers=0", "--json", "OUT/report.json"],
        ["convert", "--from", "reference", "OUT/in.pth", "OUT/model"],
        ["export", "RUN", "--out", "OUT/model.onnx"],
    ],
)
def test_an_override_without_equals_explains_the_form_before_any_work(tmp_path, capsys, command):
    argv = [a.replace("OUT", str(tmp_path / "new")).replace("RUN", str(tmp_path / "run")) for a in command]
    assert main([*argv, "train.iterations"]) == 2
    err = capsys.readouterr().err
    name = command[0]
    assert err.startswith(f"emanet {name}: error: override 'train.iterations' has no '='"), err
    assert "section.key=value" in err and "train.iterations=VALUE" in err
    assert not (tmp_path / "new").exists()


def test_train_with_an_override_split_in_two_words_says_how_to_join_them(tmp_path):
    # argparse takes the overrides before an option; those after it used to be "unrecognized arguments"
    proc = run_cli("train", "data.num_workers=0", "--device", "cpu", "train.iterations", "1000")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "unrecognized arguments" not in proc.stderr
    assert proc.stderr.strip() == (
        "emanet train: error: override 'train.iterations' has no '=': give each as one word "
        "section.key=value (e.g. train.iterations=1000)"
    )
