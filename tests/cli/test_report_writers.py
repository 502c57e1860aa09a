"""The writers outside training and deploy, as users meet them: `emanet demo`, `study`, `bench` (cpu, gpu,
onnx) and `check-data --json`. A full disk while a file is written leaves every earlier file byte-identical
and no temporary, exit 2 and a message naming the file; an --out that cannot be written fails before any work;
check-data's report is replaced only with --overwrite; a run or model folder's own files are never touched.

A full disk and a read-only folder are simulated in the subprocess (tests run as root, where chmod stops
nothing, and without mounts): FULL_DISK=NAME,... makes every file opened for writing whose name holds NAME
(its temporary included) write half of its first chunk and then fail with ENOSPC, as a disk that fills up
does; READ_ONLY=FOLDER makes the writable probe of a folder under FOLDER fail with EROFS.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emanet.cli.common import reserved
from tests.conftest import tiny_run

WRAPPER = r"""
import builtins, errno, io, os, sys, tempfile

full = [s for s in os.environ.get("FULL_DISK", "").split(",") if s]
read_only = os.environ.get("READ_ONLY")
real_open, real_temporary = builtins.open, tempfile.TemporaryFile


class FullFile:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])  # part of it lands, then the disk is full
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def open_(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    name = os.path.basename(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else ""
    if any(c in mode for c in "wax+") and any(s in name for s in full):
        return FullFile(f)
    return f


def temporary(*args, dir=None, **kwargs):
    if read_only and dir is not None and os.path.abspath(dir).startswith(read_only):
        raise OSError(errno.EROFS, "Read-only file system")
    return real_temporary(*args, dir=dir, **kwargs)


builtins.open = io.open = open_
tempfile.TemporaryFile = temporary
sys.argv[0] = "emanet"
from emanet.cli.main import run

run()
"""

# a folder that is both a run folder and a model folder: none of these may change
RUN_FILES = ("config.yaml", "metrics.jsonl", "latest.txt", "iter_0000002.pt", "classes.json")
MODEL_FILES = ("model.safetensors", "config.json")

DEMO = [
    "train.iterations=2",
    "train.batch_size=2",
    "train.eval_interval=0",
    "model.backbone_width=8",
    "model.channels=16",
    "model.mid_channels=8",
    "data.num_workers=0",
    "data.options={length: 4, val_length: 6, image_size: 48, min_objects: 2, max_objects: 6}",  # 6 samples shown
    "data.crop_size=48",
]


def emanet(*args: str, full: str = "", read_only: Path | None = None) -> subprocess.CompletedProcess:
    """`emanet ARGS` in a subprocess with the full disk / read-only folder of the module docstring."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "FULL_DISK": full}
    env["READ_ONLY"] = str(read_only) if read_only else ""
    cmd = [sys.executable, "-c", WRAPPER, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


def plant(folder: Path, *names: str) -> dict[str, str]:
    """Earlier files (and a run and model folder's own) in ``folder``; returns their hashes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*RUN_FILES, *MODEL_FILES, *names):
        (folder / name).write_text(f"earlier {name}\n")
    return {name: h for name, h in hashes(folder).items() if "/" not in name}


def assert_refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def test_no_report_writer_names_a_run_or_model_folders_own_file(tmp_path):
    """demo, study and bench rewrite their own files in --out; a folder that holds a run and a model
    reserves none of their names (so `emanet bench --out RUN` cannot replace a run's file)."""
    plant(tmp_path)
    demo = ["report.md", "report.html", "curves.png", "samples.png", "responsibilities.png", "summary.json"]
    study = ["study.json", "commands.sh", "results.json", "table.md", "iterations.png", "bases.png"]
    bench = [f"{stem}.{ext}" for stem in ("results", "results_quick", "gpu_results") for ext in ("md", "json")]
    bench += ["onnx_results.md", "onnx_results.json", "onnx_results_quick.md", "onnx_results_quick.json"]
    assert reserved(tmp_path / "config.yaml") and reserved(tmp_path / "model.safetensors")  # the folder counts
    assert [name for name in demo + study + bench if reserved(tmp_path / name)] == []


# ----------------------------------------------------------------------------- demo


@pytest.mark.parametrize("name", ["report.md", "curves.png"])
def test_demo_on_a_full_disk_keeps_the_earlier_report(tmp_path, name):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    before = plant(out, "report.md", "report.html", "curves.png", "summary.json")
    proc = emanet("demo", "--out", str(out), "--no-progress", *DEMO, full=name)
    assert_refused(proc, f"{out / name}: No space left on device")
    after = hashes(out)
    assert after[name] == before[name] and after["summary.json"] == before["summary.json"]  # the one that failed
    assert {n: after[n] for n in RUN_FILES + MODEL_FILES} == {n: before[n] for n in RUN_FILES + MODEL_FILES}
    assert temporaries(out) == []


def test_demo_into_a_read_only_or_impossible_folder_fails_before_training(tmp_path):
    proc = emanet("demo", "--out", str(tmp_path / "ro" / "demo"), *DEMO, read_only=tmp_path / "ro")
    assert_refused(proc, f"{tmp_path / 'ro' / 'demo'}: Read-only file system")
    assert "training" not in proc.stderr and not (tmp_path / "ro" / "demo" / "runs").exists()
    (tmp_path / "file").write_text("a file, not a folder")
    proc = emanet("demo", "--out", str(tmp_path / "file" / "demo"), *DEMO)
    assert_refused(proc, f"{tmp_path / 'file' / 'demo'}: Not a directory")
    assert "training" not in proc.stderr


# ----------------------------------------------------------------------------- study

# one T_train, one T_eval: a single tiny run of one iteration
STUDY = ["--config", "synthetic_toy", *tiny_run("train.iterations=1", "train.batch_size=2")]
STUDY += ["train.checkpoint_interval=1", "--train-stages", "1", "--eval-stages", "1", "--no-progress"]


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """A finished iterations study (one tiny run) in a folder that also holds a run's and model's files."""
    out = tmp_path_factory.mktemp("study")
    plant(out)
    proc = emanet("study", "iterations", "--out", str(out), *STUDY)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("name", ["commands.sh", "iterations.png", "table.md"])
def test_study_on_a_full_disk_keeps_every_earlier_file(finished_study, name):
    """The same command again (it continues: nothing to train or evaluate) with the disk full on ``name``."""
    out = finished_study
    if name == "iterations.png":
        pytest.importorskip("matplotlib")
    before = hashes(out)
    assert {"table.md", "results.json", "commands.sh", "study.json"} <= set(before)
    proc = emanet("study", "iterations", "--out", str(out), *STUDY, full=name)
    assert_refused(proc, f"{out / name}: No space left on device")
    assert hashes(out) == before and temporaries(out) == []


def test_study_into_a_read_only_folder_fails_before_training(tmp_path):
    out = tmp_path / "ro" / "study"
    proc = emanet("study", "iterations", "--out", str(out), *STUDY, read_only=tmp_path / "ro")
    assert_refused(proc, f"{out}: Read-only file system")
    assert "training" not in proc.stderr and not (out / "runs").exists() and not (out / "study.json").exists()


# ----------------------------------------------------------------------------- bench


def test_bench_gpu_dry_run_on_a_full_disk_keeps_the_earlier_tables(tmp_path):
    before = plant(tmp_path, "gpu_results.json", "gpu_results.md")
    proc = emanet("bench", "gpu", "--dry-run", "--budget-s", "0", "--out", str(tmp_path), full="gpu_results.json")
    assert_refused(proc, f"{tmp_path / 'gpu_results.json'}: No space left on device")
    assert hashes(tmp_path) == before and temporaries(tmp_path) == []
    proc = emanet("bench", "gpu", "--dry-run", "--budget-s", "0", "--out", str(tmp_path))  # a run's folder
    assert proc.returncode == 0, proc.stderr
    assert {n: h for n, h in hashes(tmp_path).items() if not n.startswith("gpu_results")} == {
        n: h for n, h in before.items() if not n.startswith("gpu_results")
    }


def test_bench_cpu_on_a_full_disk_and_report_re_render_keep_the_earlier_tables(tmp_path):
    before = plant(tmp_path, "results_quick.json", "results_quick.md")
    args = ["bench", "--parts", "compile", "--quick", "--out", str(tmp_path)]
    proc = emanet(*args, full="results_quick.json")
    assert_refused(proc, f"{tmp_path / 'results_quick.json'}: No space left on device")
    assert hashes(tmp_path) == before and temporaries(tmp_path) == []
    # --report re-renders the .md beside a results JSON: a full disk keeps the earlier .md
    committed = Path(__file__).parents[2] / "benchmarks" / "results.json"
    (tmp_path / "r.json").write_bytes(committed.read_bytes())
    (tmp_path / "r.md").write_text("earlier table\n")
    proc = emanet("bench", "--report", str(tmp_path / "r.json"), full="r.md")
    assert_refused(proc, f"{tmp_path / 'r.md'}: No space left on device")
    assert (tmp_path / "r.md").read_text() == "earlier table\n" and temporaries(tmp_path) == []


@pytest.mark.parametrize("suite", [[], ["gpu", "--dry-run"], ["onnx", "--quick"]], ids=["cpu", "gpu", "onnx"])
def test_bench_into_a_read_only_folder_fails_before_measuring(tmp_path, suite):
    if suite and suite[0] == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    out = tmp_path / "ro" / "bench"
    proc = emanet("bench", *suite, "--out", str(out), read_only=tmp_path / "ro")
    assert_refused(proc, f"{out}: Read-only file system")
    assert "machine" not in proc.stderr and "matmul" not in proc.stderr and list(out.iterdir()) == []


# ----------------------------------------------------------------------------- check-data


@pytest.fixture
def dataset(make_folder):
    root, _ = make_folder(classes=("sky", "road", "car"))
    return ["check-data", "data.dataset=folder", f"data.root={root}", "data.train_split=train"]


def test_check_data_json_needs_overwrite_to_replace_a_report(tmp_path, dataset):
    out = tmp_path / "reports" / "check.json"
    proc = emanet(*dataset, "model.num_classes=3", "--split", "train", "--no-progress", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["ok"] is True  # a missing folder is made
    out.write_text("earlier report\n")
    proc = emanet(*dataset, "model.num_classes=3", "--split", "train", "--json", str(out))
    assert_refused(proc, f"--json {out} exists; add --overwrite")
    assert "folder train" not in proc.stdout  # refused before the scan
    assert out.read_text() == "earlier report\n"
    proc = emanet(*dataset, "model.num_classes=3", "--split", "train", "--json", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["ok"] is True


def test_check_data_json_on_a_full_disk_keeps_the_earlier_report(tmp_path, dataset):
    out = tmp_path / "check.json"
    before = plant(tmp_path, "check.json")
    args = [*dataset, "model.num_classes=3", "--split", "train", "--json", str(out), "--overwrite"]
    proc = emanet(*args, full="check.json")
    assert_refused(proc, f"{out}: No space left on device")
    assert {n: h for n, h in hashes(tmp_path).items() if "/" not in n} == before and temporaries(tmp_path) == []


def test_check_data_json_never_replaces_a_runs_file_and_fails_before_scanning_a_read_only_folder(tmp_path, dataset):
    run = tmp_path / "run"
    before = plant(run)
    proc = emanet(*dataset, "model.num_classes=3", "--json", str(run / "config.yaml"), "--overwrite")
    assert_refused(proc, "config.yaml belongs to the run in")
    assert hashes(run) == before
    out = tmp_path / "ro" / "reports" / "check.json"
    proc = emanet(*dataset, "model.num_classes=3", "--json", str(out), read_only=tmp_path / "ro")
    assert_refused(proc, f"{out.parent}: Read-only file system")
    assert "folder train" not in proc.stdout
