"""Every file `export`, `eval`, `predict` and `convert` write, as a user meets it (the CLI in a subprocess): an
existing file is replaced only with --overwrite, a run's own files never, a full disk keeps the old bytes and
leaves no temporary, and each message names the file (exit 2, no traceback)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emanet.cli.main import main
from emanet.pretrained import load_model, save_pretrained
from tests.conftest import run_cli as emanet
from tests.conftest import tiny_run

TINY = tiny_run("train.batch_size=2", length=4, val_length=1)

pytestmark = pytest.mark.usefixtures("one_thread")

# `python -c FULL_DISK ARGS` runs `emanet ARGS` on a "full disk" under $FULL_DISK: a file opened there for writing
# (whose name ends with $FULL_SUFFIX, when set) takes 64 bytes and then raises ENOSPC, as a real full disk does in
# the middle of a write (PIL, json, numpy, torch.onnx and matplotlib all open files through builtins.open/io.open)
FULL_DISK = """
import builtins, errno, io, os, sys
FULL = os.path.realpath(os.environ["FULL_DISK"]) + os.sep
SUFFIX = os.environ.get("FULL_SUFFIX", "")
_open = io.open


class Full:
    def __init__(self, f):
        self.f, self.left = f, 64

    def write(self, data):
        if len(data) <= self.left:
            self.left -= len(data)
            return self.f.write(data)
        self.f.write(data[: self.left])
        self.f.flush()
        self.left = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def full_open(file, mode="r", *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    writes = any(c in mode for c in "wax+")
    if writes and isinstance(file, (str, os.PathLike)):
        path = os.path.realpath(file)
        if path.startswith(FULL) and path.endswith(SUFFIX):
            return Full(f)
    return f


builtins.open = io.open = full_open
sys.argv = ["emanet", *sys.argv[1:]]
from emanet.cli.main import run

run()
"""


def on_full_disk(folder: Path, *args: str, suffix: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FULL_DISK": str(folder), "FULL_SUFFIX": suffix}
    return subprocess.run(
        [sys.executable, "-c", FULL_DISK, *args], capture_output=True, text=True, env=env, timeout=300
    )


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (temporaries included: none may be left)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in proc.stderr, (word, proc.stderr[-3000:])


def no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("writers") / "run"
    assert main(["train", "--no-progress", *TINY, "train.iterations=1", f"train.out_dir={run}"]) == 0
    return run


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


# ----------------------------------------------------------------------------- export


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    pytest.importorskip("onnx")
    path = tmp_path / "out" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(b"an earlier export")
    return path


def test_export_over_an_existing_file_needs_overwrite(run, onnx_file):
    before = digests(onnx_file.parent)
    proc = emanet("export", str(run), "--out", str(onnx_file))
    refused(proc, f"--out {onnx_file} exists", "--overwrite")
    assert "written" not in proc.stdout and digests(onnx_file.parent) == before

    proc = emanet("export", str(run), "--out", str(onnx_file), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    import onnx

    onnx.checker.check_model(str(onnx_file))
    assert sorted(p.name for p in onnx_file.parent.iterdir()) == ["model.onnx"]


def test_export_and_eval_never_write_over_a_runs_own_files(run):
    before = digests(run)
    # the newest checkpoint (the next eval would silently fall back to an older one) and the run's config
    for command, name in (("export", "iter_0000001.pt"), ("eval", "config.yaml")):
        proc = emanet(command, str(run), "--out", str(run / name), "--overwrite")
        refused(proc, f"--out {run / name}: {name} belongs to the run in {run}", "never replaced")
        assert digests(run) == before


def test_export_on_a_full_disk_keeps_the_earlier_file(run, onnx_file):
    before = digests(onnx_file.parent)
    proc = on_full_disk(onnx_file.parent, "export", str(run), "--out", str(onnx_file), "--overwrite")
    refused(proc, f"{onnx_file}: No space left on device")
    assert digests(onnx_file.parent) == before  # byte-identical, and no temporary beside it


# ----------------------------------------------------------------------------- eval


def test_eval_rewrites_its_default_file_but_an_explicit_out_needs_overwrite(run, tmp_path):
    default = run / "eval_iter_0000001.json"  # beside the checkpoint: each eval's own file
    default.write_text("an earlier eval")
    assert emanet("eval", str(run), "--no-progress").returncode == 0
    assert json.loads(default.read_text())["images"] == 1

    out = tmp_path / "mine.json"
    out.write_text("my notes")
    proc = emanet("eval", str(run), "--no-progress", "--out", str(out))
    refused(proc, f"--out {out} exists", "--overwrite")
    assert "mIoU" not in proc.stdout and out.read_text() == "my notes"  # refused before the evaluation
    assert emanet("eval", str(run), "--no-progress", "--out", str(out), "--overwrite").returncode == 0
    assert json.loads(out.read_text())["images"] == 1


def test_eval_into_a_missing_folder_creates_it_first(run, tmp_path):
    out = tmp_path / "missing" / "deeper" / "eval.json"
    proc = emanet("eval", str(run), "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["images"] == 1


def earlier(folder: Path, *names: str) -> dict[str, str]:
    """Files of an earlier run in ``folder`` (their contents do not matter: they must stay as they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(f"earlier {name}".encode())
    return digests(folder)


def test_eval_on_a_full_disk_keeps_the_earlier_results(run, tmp_path):
    out = tmp_path / "results" / "eval.json"
    before = earlier(out.parent, "eval.json")
    proc = on_full_disk(out.parent, "eval", str(run), "--no-progress", "--out", str(out), "--overwrite")
    refused(proc, f"{out}: No space left on device")
    assert digests(out.parent) == before


def test_eval_plots_on_a_full_disk_keep_the_earlier_figures(run, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "results" / "eval.json"
    figures = earlier(out.parent, "eval_confusion.png", "eval_iou.png")
    # the disk fills up after the JSON: only the PNGs fail
    args = ("eval", str(run), "--no-progress", "--plot", "--out", str(out), "--overwrite")
    proc = on_full_disk(out.parent, *args, suffix=".png")
    refused(proc, f"{out.parent / 'eval_confusion.png'}: No space left on device")
    after = digests(out.parent)
    assert {name: after[name] for name in figures} == figures and sorted(after) == ["eval.json", *figures]
    assert json.loads(out.read_text())["images"] == 1  # the JSON written before is whole


# ----------------------------------------------------------------------------- predict


def test_predict_refuses_outputs_that_exist_unless_overwrite(run, images, tmp_path):
    out = tmp_path / "pred"
    before = earlier(out, "a.png", "a_overlay.png", "b_color.png", "b.png")
    proc = emanet("predict", str(run), str(images), "--out", str(out), "--no-progress")
    refused(proc, f"--out {out}: 4 output(s) exist already", str(out / "a_overlay.png"), "and 1 more", "--overwrite")
    assert digests(out) == before
    assert emanet("predict", str(run), str(images), "--out", str(out), "--overwrite").returncode == 0
    assert len(digests(out)) == 6  # a, b: NAME.png, NAME_color.png, NAME_overlay.png, all replaced
    assert not set(digests(out).items()) & set(before.items())


def test_predict_on_a_full_disk_leaves_no_truncated_png(run, images, tmp_path):
    out = tmp_path / "pred"
    before = earlier(out, "a.png", "a_color.png")
    proc = on_full_disk(out, "predict", str(run), str(images), "--out", str(out), "--overwrite", "--no-progress")
    refused(proc, f"{out / 'a.png'}: No space left on device", "stopped after 0 of 2 images")
    assert digests(out) == before  # the earlier PNGs byte-identical, no temporary left


def test_predict_sets_aside_an_input_whose_output_name_is_too_long_and_carries_on(run, images, tmp_path):
    long = images / ("x" * 246 + ".png")  # fits the file system; NAME_overlay.png (258 bytes) does not
    Image.open(images / "a.png").save(long)
    out = tmp_path / "pred"
    proc = emanet("predict", str(run), str(images), "--out", str(out), "--no-progress")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{long}: its output name {'x' * 246}_overlay.png is 258 bytes" in proc.stderr
    assert "2 of 3 images predicted" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}{s}" for n in "ab" for s in (".png", "_color.png", "_overlay.png")
    )


def test_predict_carries_on_when_the_file_system_refuses_an_output(run, images, tmp_path):
    out = tmp_path / "pred"
    (out / "a_color.png").mkdir(parents=True)  # a folder where a's colour map should go: its rename fails
    proc = emanet("predict", str(run), str(images), "--out", str(out), "--overwrite", "--no-progress")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{images / 'a.png'}: cannot write {out / 'a_color.png'}: Is a directory" in proc.stderr
    assert "1 of 2 images predicted" in proc.stdout and (out / "b_overlay.png").is_file()
    no_temporaries(out)


def test_predict_into_its_own_input_folder_says_why_nothing_was_read(run, images):
    before = digests(images)
    proc = emanet("predict", str(run), str(images), "--out", str(images), "--no-progress")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{images}: its 2 image(s) lie under --out" in proc.stderr
    assert "give an --out outside the input folder" in proc.stderr and "no images" not in proc.stderr
    assert digests(images) == before


# ----------------------------------------------------------------------------- convert


def test_convert_never_writes_over_a_model_folders_weights_and_checks_before_reading(run, tmp_path):
    folder = tmp_path / "model"
    loaded = load_model(run)
    save_pretrained(loaded.model, loaded.config, folder)
    before = digests(folder)
    # the source does not exist: the destination is refused before it would be read
    proc = emanet(
        "convert", "--from", "torchvision", str(tmp_path / "no.pth"), str(folder / "model.safetensors"), "--overwrite"
    )
    refused(proc, f"destination {folder / 'model.safetensors'}: model.safetensors belongs to the model folder")
    assert digests(folder) == before
