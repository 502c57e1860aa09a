"""Run folders through the CLI, as users meet them: a fresh run into a folder holding one, two trainings at
once, a resume with a changed config, leftovers of a killed run, class names and palettes carried along,
write errors, bad validation files, a diverged run. Each checks the exit code, the message, that no
traceback is printed and that the files of an earlier run are byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emanet.checkpoint import atomic_torch_save, latest_checkpoint, load_checkpoint
from emanet.cli.main import main
from emanet.config import load_config
from emanet.train.loop import train
from emanet.train.runs import RESUME_MAY_CHANGE, RunFolderError, RunLock, config_differences, cut_metrics
from emanet.train.setup import TrainingStopped
from tests.conftest import run_cli as emanet
from tests.conftest import tiny_run

TINY = tiny_run("train.batch_size=2", "train.log_interval=1")

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def clean_failure(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    for word in words:
        assert word in proc.stderr, (word, proc.stderr[-3000:])


def train_in_process(run: Path, *extra: str) -> None:
    assert main(["train", "--no-progress", *TINY, f"train.out_dir={run}", *extra]) == 0


# ----------------------------------------------------------------------------- 1. a folder holding a run


def test_a_fresh_run_into_a_run_folder_is_refused_and_overwrite_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, "train.iterations=2", "train.checkpoint_interval=1")
    before = hashes(run)
    refused = emanet("train", "--no-progress", *TINY, "train.iterations=1", f"train.out_dir={run}")
    clean_failure(refused, 2, "already holds a run", "--resume", "--overwrite")
    assert hashes(run) == before

    fresh = emanet("train", "--no-progress", *TINY, "train.iterations=1", f"train.out_dir={run}", "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    (old,) = tmp_path.glob("run.old-*")
    assert hashes(old) == before  # the earlier run, complete and unchanged, beside the new one
    assert sorted(p.name for p in run.glob("iter_*.pt")) == ["iter_0000001.pt"]
    assert (run / (run / "latest.txt").read_text().strip()).is_file()


# ----------------------------------------------------------------------------- 2. the lock


def test_a_second_training_is_refused_naming_the_first_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emanet",
            "train",
            "--no-progress",
            *TINY,
            "data.num_workers=1",
            "train.iterations=100000",
            "train.checkpoint_interval=1",
            f"train.out_dir={run}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(run).path is None:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        for flags in ((), ("--resume",), ("--overwrite",)):
            second = emanet("train", "--no-progress", *TINY, "train.iterations=1", f"train.out_dir={run}", *flags)
            clean_failure(second, 2, "in use by another training", f"PID {first.pid}")
        assert first.poll() is None  # the first run went on
    finally:
        first.send_signal(signal.SIGKILL)  # no clean-up at all: the lock must not outlive the process
        first.communicate(timeout=60)
    assert not list(tmp_path.glob("run.old-*"))
    reached = load_checkpoint(latest_checkpoint(run).path)["iteration"]
    resumed = emanet(
        "train", "--no-progress", *TINY, f"train.iterations={reached + 1}", "--resume", f"train.out_dir={run}"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == list(range(1, reached + 2))  # none twice


def test_lock_is_exclusive_within_a_process_and_released(tmp_path):
    with RunLock(tmp_path), pytest.raises(RunFolderError, match="in use by another training"):
        RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released on exit


# ----------------------------------------------------------------------------- 3. resume with another config


def test_resume_with_a_changed_model_lists_the_keys_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, "train.iterations=2")
    before = hashes(run)
    proc = emanet(
        "train",
        "--no-progress",
        *TINY,
        "model.num_bases=8",
        "data.crop_size=40",
        "train.iterations=3",
        "--resume",
        f"train.out_dir={run}",
    )
    clean_failure(proc, 2, "model.num_bases: 4 -> 8", "data.crop_size: 32 -> 40", "2 key(s)")
    assert "train.iterations" not in proc.stderr.split("a resume may change")[0]  # allowed: not listed
    assert hashes(run) == before  # config.yaml included


def test_allowed_resume_keys_live_in_one_list():
    saved = {"train": {"iterations": 10, "seed": 1}, "optim": {"lr": 0.1}, "eval": {"flip": False}}
    current = {"train": {"iterations": 20, "seed": 2}, "optim": {"lr": 0.01}, "eval": {"flip": True}}
    assert config_differences(saved, current) == ["train.seed: 1 -> 2"]
    assert "train.iterations" in RESUME_MAY_CHANGE and "train.seed" not in RESUME_MAY_CHANGE


# ----------------------------------------------------------------------------- 4. leftovers


def test_resume_removes_stale_temporaries_and_cuts_metrics_back_to_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, "train.iterations=4", "train.checkpoint_interval=2", "train.keep_checkpoints=0")
    # as after a kill -9 at iteration 4, mid-save: no iter_4 yet, a temporary, a torn last metrics line
    (run / "iter_0000004.pt").unlink()
    (run / "latest.txt").write_text("iter_0000002.pt\n")
    (run / ".iter_0000004.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")
    (run / ".latest.txt.tmp").write_text("iter_0000004.pt")  # the name an older release gave it
    (run / ".metrics.jsonl.k3j_x9a2.tmp.jsonl").write_text("{")  # atomic_path's name for it
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "it')
    lines_before = (run / "metrics.jsonl").read_text().splitlines()
    proc = emanet(
        "train",
        "--no-progress",
        *TINY,
        "train.iterations=4",
        "train.checkpoint_interval=2",
        "--resume",
        f"train.out_dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(run.glob(".*.tmp*")) and "removed 3 temporary file(s)" in proc.stdout + proc.stderr
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    cut = (run / "metrics.cut.jsonl").read_text().splitlines()
    assert json.loads(cut[0])["kind"] == "cut" and json.loads(cut[0])["resumed_at"] == 2
    kept = [x for x in lines_before if x.startswith("{") and x.endswith("}") and json.loads(x)["iter"] <= 2]
    assert sorted(cut[1:] + kept) == sorted(lines_before)  # every earlier line is in one file or the other


def test_cut_metrics_without_later_lines_changes_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "iter": 1}\n')
    assert cut_metrics(tmp_path, 1) == 0 and not (tmp_path / "metrics.cut.jsonl").exists()


# ----------------------------------------------------------------------------- 5. class names and palette


def test_class_names_and_palette_of_a_folder_dataset_reach_predict_eval_export_and_model_folders(make_folder, tmp_path):
    palette = [(10, 20, 30), (200, 100, 0), (0, 250, 120)]
    root, _ = make_folder(split="train", classes=("sky", "road", "car"), palette=palette)
    make_folder(split="val", names=("v",), classes=("sky", "road", "car"), palette=palette)
    run = tmp_path / "run"
    train_in_process(
        run,
        "model.num_classes=3",
        "data.dataset=folder",
        f"data.root={root}",
        "data.train_split=train",
        "data.crop_size=16",
        "data.options={}",
        "train.iterations=1",
    )
    ckpt = load_checkpoint(latest_checkpoint(run).path)
    assert ckpt["class_names"] == ["sky", "road", "car"] and [tuple(c) for c in ckpt["palette"]] == palette
    assert json.loads((run / "classes.json").read_text())["class_names"] == ["sky", "road", "car"]

    image = root / "images" / "train" / "b.png"
    out = tmp_path / "pred"
    proc = emanet("predict", str(run), str(image), "--out", str(out), "--no-progress", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = Image.open(out / "b.png")
    assert np.array(written.getpalette()[:9]).reshape(3, 3).tolist() == [list(c) for c in palette]
    colours = {tuple(c) for c in np.asarray(Image.open(out / "b_color.png").convert("RGB")).reshape(-1, 3)}
    assert colours <= set(palette)

    from emanet.pretrained import load_model, save_pretrained

    loaded = load_model(run)
    assert loaded.class_names == ["sky", "road", "car"] and loaded.palette == palette
    folder = save_pretrained(
        loaded.model, loaded.config, tmp_path / "model", class_names=loaded.class_names, palette=loaded.palette
    )
    assert load_model(folder).class_names == ["sky", "road", "car"]

    onnx = pytest.importorskip("onnx")
    proc = emanet("export", str(run), "--out", str(tmp_path / "m.onnx"), "--size", "32", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["emanet.class_names"]) == ["sky", "road", "car"]
    assert json.loads(meta["emanet.palette"]) == [list(c) for c in palette]


def test_synthetic_runs_record_their_class_names(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, "train.iterations=1")
    assert load_checkpoint(latest_checkpoint(run).path)["class_names"] == [
        "background",
        "tint_1",
        "tint_2",
        "tint_3",
        "tint_4",
    ]


# ----------------------------------------------------------------------------- 6. class count


@pytest.mark.parametrize("n", [3, 8])
def test_num_classes_that_does_not_match_the_dataset_is_refused_before_training(tmp_path, n):
    run = tmp_path / "run"
    proc = emanet(
        "train", "--no-progress", *TINY, f"model.num_classes={n}", "train.iterations=1", f"train.out_dir={run}"
    )
    clean_failure(proc, 2, f"model.num_classes={n}", "5 classes", "set model.num_classes=5")
    assert not list(run.glob("*")) or [p.name for p in run.iterdir()] == [".lock"]  # nothing written


# ----------------------------------------------------------------------------- 7. write errors


def _mount_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _mount_ok(), reason="needs unshare -rm and tmpfs mounts (user namespaces)")


def in_namespace(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace (its tmpfs mounts vanish with it)."""
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def _cmd(*args: str) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in (sys.executable, "-m", "emanet", *args))


@needs_mount
def test_full_disk_during_a_checkpoint_keeps_the_previous_checkpoint_and_latest(tmp_path):
    probe = tmp_path / "probe"
    train_in_process(probe, "train.iterations=1")
    size = (probe / "iter_0000001.pt").stat().st_size
    disk, keep = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    run = disk / "run"
    args = [
        "train",
        "--no-progress",
        *TINY,
        "train.iterations=3",
        "train.checkpoint_interval=1",
        "train.keep_checkpoints=0",
        f"train.out_dir={run}",
    ]
    # room for one checkpoint and the small files, not for a second one
    script = (
        f"mount -t tmpfs -o size={size + size // 2 + 65536} tmpfs {disk} && {_cmd(*args)} 2>&1; "
        f"echo rc=$?; cp -a {run} {keep}"
    )
    proc = in_namespace(script)
    out = proc.stdout
    assert "rc=2" in out and "Traceback" not in out, out[-3000:]
    assert "No space left on device" in out and "iter_0000002.pt" in out and "unexpected pos" not in out
    assert (keep / "latest.txt").read_text().strip() == "iter_0000001.pt"
    assert load_checkpoint(keep / "iter_0000001.pt")["iteration"] == 1
    assert not list(keep.glob(".*.tmp")) and not (keep / "iter_0000002.pt").exists()


def test_a_failed_checkpoint_write_is_a_message_naming_the_file_and_the_reason(tmp_path, monkeypatch, capsys):
    import errno

    import emanet.checkpoint as checkpoint

    saves = []

    def full_disk(obj, path):
        saves.append(path)
        if len(saves) >= 2:
            raise checkpoint.CheckpointWriteError(
                errno.ENOSPC, "cannot write a checkpoint: No space left on device", str(path)
            )
        atomic_torch_save(obj, path)

    monkeypatch.setattr(checkpoint, "atomic_torch_save", full_disk)
    run = tmp_path / "run"
    status = main(
        ["train", "--no-progress", *TINY, "train.iterations=3", "train.checkpoint_interval=1", f"train.out_dir={run}"]
    )
    err = capsys.readouterr().err
    assert status == 2 and "No space left on device" in err and "iter_0000002.pt" in err
    assert (run / "latest.txt").read_text().strip() == "iter_0000001.pt"


def test_atomic_save_reports_the_os_reason_instead_of_torchs_unexpected_pos(tmp_path, monkeypatch):
    import errno
    import io

    import emanet.checkpoint as checkpoint

    real_fdopen = os.fdopen

    class Full(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: Full(fd, "wb") if "b" in mode else real_fdopen(fd))
    target = tmp_path / "iter_0000001.pt"
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device") as info:
        atomic_torch_save({"model": {"w": torch.zeros(1000)}}, target)
    assert info.value.filename == str(target) and list(tmp_path.iterdir()) == []


@needs_mount
def test_read_only_folders_for_train_eval_export_and_check_data_are_messages(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, "train.iterations=1")
    before = hashes(run)
    ro = tmp_path / "ro"
    ro.mkdir()
    commands = {
        "train": _cmd("train", "--no-progress", *TINY, "train.iterations=1", f"train.out_dir={ro / 'run'}"),
        "eval": _cmd("eval", str(run), "--no-progress", "--out", str(ro / "eval.json")),
        "check-data": _cmd(
            "check-data",
            "--config",
            str(run / "config.yaml"),
            "--no-progress",
            "--json",
            str(ro / "sub" / "report.json"),
        ),
    }
    try:
        import onnx  # noqa: F401

        commands["export"] = _cmd("export", str(run), "--out", str(ro / "m.onnx"), "--size", "32", "32")
    except ImportError:
        pass
    script = f"mount -t tmpfs -o ro,size=64k tmpfs {ro} && " + "; ".join(
        f"echo '=== {name}'; {cmd} 2>&1; echo rc=$?" for name, cmd in commands.items()
    )
    proc = in_namespace(script)
    parts = dict(part.split("\n", 1) for part in proc.stdout.split("=== ")[1:])
    assert set(parts) == set(commands), proc.stdout[-3000:] + proc.stderr[-2000:]
    for name, text in parts.items():
        assert "rc=2" in text and "Traceback" not in text, (name, text[-3000:])
        assert "Read-only file system" in text and str(ro) in text, (name, text[-3000:])
    assert hashes(run) == before


# ----------------------------------------------------------------------------- 8. bad validation files


def _folder_with_bad_val(make_folder) -> Path:
    root, _ = make_folder(split="train")
    make_folder(split="val", names=("v", "w"))
    (root / "images" / "val" / "v.jpg").write_bytes(b"not a jpeg")
    return root


def _folder_args(root: Path, run: Path) -> list[str]:
    return [
        *TINY,
        "model.num_classes=3",
        "data.dataset=folder",
        f"data.root={root}",
        "data.train_split=train",
        "data.crop_size=16",
        "data.options={}",
        "train.iterations=1",
        f"train.out_dir={run}",
    ]


def test_a_bad_validation_file_is_found_before_training(make_folder, tmp_path):
    root = _folder_with_bad_val(make_folder)
    run = tmp_path / "run"
    proc = emanet("train", "--no-progress", *_folder_args(root, run))
    clean_failure(proc, 2, str(root / "images" / "val" / "v.jpg"), "validation split", "data.on_bad_sample=skip")
    assert not list(run.glob("iter_*.pt")) and not (run / "config.yaml").exists()  # training never started


def test_skip_policy_leaves_bad_validation_files_out_of_evaluation_and_lists_them(make_folder, tmp_path):
    root = _folder_with_bad_val(make_folder)
    run = tmp_path / "run"
    proc = emanet("train", "--no-progress", *_folder_args(root, run), "data.on_bad_sample=skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = str(root / "images" / "val" / "v.jpg")
    said = proc.stdout + proc.stderr  # the run's log lines go to stderr
    assert bad in said and "left out of evaluation" in said
    result = json.loads((run / "eval.json").read_text())
    assert result["images"] == 1 and [s.split(": ")[0] for s in result["skipped_files"]] == [bad]
    evaluated = emanet("eval", str(run), "--no-progress", "data.on_bad_sample=skip")
    assert evaluated.returncode == 0 and bad in evaluated.stdout, evaluated.stderr[-3000:]


# ----------------------------------------------------------------------------- 9. a diverged run


def test_a_diverged_run_lists_its_checkpoints_flags_suspect_ones_and_resumes_from_a_chosen_one(tmp_path):
    run = tmp_path / "run"
    common = ["--no-progress", *TINY, "train.checkpoint_interval=1", "train.keep_checkpoints=0", f"train.out_dir={run}"]
    train_in_process(run, "train.iterations=2", "train.checkpoint_interval=1", "train.keep_checkpoints=0")
    proc = emanet("train", *common, "train.iterations=6", "optim.lr=1e30", "--resume")  # step 3 explodes the weights
    clean_failure(proc, 4, "non-finite loss", "--resume-from")
    assert f"not flagged SUSPECT: --resume-from {run / 'iter_0000002.pt'}" in proc.stderr  # the newest it trusts
    lines = {line.split()[0]: line for line in proc.stderr.splitlines() if line.strip().startswith(str(run))}
    assert set(lines) == {str(run / f"iter_000000{i}.pt") for i in (1, 2, 3)}
    assert "SUSPECT" in lines[str(run / "iter_0000003.pt")] and "parameter norm" in lines[str(run / "iter_0000003.pt")]
    assert "SUSPECT" not in lines[str(run / "iter_0000001.pt")] and "loss 2." in lines[str(run / "iter_0000001.pt")]

    exploded = hashes(run)["iter_0000003.pt"]
    again = emanet("train", *common, "train.iterations=4", "--resume-from", str(run / "iter_0000002.pt"))
    assert again.returncode == 0, again.stderr[-3000:]
    (aside,) = run.glob("superseded-*")
    assert hashes(aside) == {"iter_0000003.pt": exploded}  # the exploded one is kept aside, not overwritten
    ckpt = load_checkpoint(latest_checkpoint(run).path)
    assert ckpt["iteration"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


def test_resume_from_a_checkpoint_of_another_folder_is_refused(tmp_path):
    other = tmp_path / "other"
    train_in_process(other, "train.iterations=1")
    proc = emanet(
        "train",
        "--no-progress",
        *TINY,
        "train.iterations=2",
        f"train.out_dir={tmp_path / 'run'}",
        "--resume-from",
        str(other / "iter_0000001.pt"),
    )
    clean_failure(proc, 2, "not a checkpoint of the run folder", f"train.out_dir={other}")


def test_resume_when_every_checkpoint_is_damaged_is_refused_not_restarted(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, "train.iterations=1")
    data = (run / "iter_0000001.pt").read_bytes()
    (run / "iter_0000001.pt").write_bytes(data[: len(data) // 2])
    before = hashes(run)
    proc = emanet("train", "--no-progress", *TINY, "train.iterations=2", "--resume", f"train.out_dir={run}")
    clean_failure(proc, 2, "no readable checkpoint", "--overwrite")
    assert hashes(run) == before


def test_under_torchrun_rank_0_refuses_for_every_rank_and_says_it_once(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, "train.iterations=1")
    before = hashes(run)
    proc = emanet(
        "train",
        "--no-progress",
        *TINY,
        "train.iterations=1",
        f"train.out_dir={run}",
        processes=2,
    )
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("already holds a run") == 1, proc.stderr[-4000:]
    assert "exitcode  : 2" in proc.stderr or "exit code 2" in proc.stderr.lower(), proc.stderr[-4000:]
    assert hashes(run) == before


def test_a_stop_reaches_on_stop_before_train_raises_it(tmp_path):
    # the CLI's rank 0 reports there, before the ranks meet and may exit (torchrun then stops the rest)
    run = tmp_path / "run"
    train_in_process(run, "train.iterations=1")
    seen = []
    with pytest.raises(TrainingStopped) as raised:
        train(load_config(None, [*TINY, f"train.out_dir={run}"]), progress=False, on_stop=seen.append)
    assert seen == [raised.value] and "already holds a run" in str(raised.value)


def test_overwrite_and_resume_together_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    train_in_process(run, "train.iterations=1")
    before = hashes(run)
    assert main(["train", *TINY, f"train.out_dir={run}", "--resume", "--overwrite"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert hashes(run) == before and not list(tmp_path.glob("run.old-*"))
