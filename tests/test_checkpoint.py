"""Checkpoint files: atomic writes, the latest pointer, keeping k, clear errors, fallback past damaged files."""

from __future__ import annotations

import errno
import os
import signal
import tempfile
import threading
import time

import pytest
import torch

from emanet.checkpoint import (
    FORMAT_VERSION,
    RESUME_KEYS,
    atomic_path,
    atomic_torch_save,
    checkpoint_candidates,
    checkpoint_iteration,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
    write_bytes_atomic,
    write_text_atomic,
)


def _state(it: int) -> dict:
    return {"model": {"w": torch.full((64,), float(it))}, "optimizer": {}, "iteration": it}


def test_save_keeps_the_newest_k_and_points_at_the_latest(tmp_path):
    for it in (1, 2, 3, 4):
        save_checkpoint(_state(it), tmp_path, it, keep=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*.pt")) == ["iter_0000003.pt", "iter_0000004.pt"]
    latest = latest_checkpoint(tmp_path).path
    assert latest.name == "iter_0000004.pt"
    ckpt = load_checkpoint(latest)
    assert ckpt["iteration"] == 4 and ckpt["format_version"] == FORMAT_VERSION and ckpt["model"]["w"][0] == 4.0
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_failing_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "c.pt"
    atomic_torch_save({"model": {"a": torch.ones(2)}}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"model": {"a": Boom()}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def test_a_save_dying_midway_keeps_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(_state(1), tmp_path, 1)

    def half_written(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial zip")  # some bytes reach the disk, then the process "crashes"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_state(2), tmp_path, 2)
    monkeypatch.undo()
    assert (tmp_path / "latest.txt").read_text().strip() == "iter_0000001.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001.pt", "latest.txt"]
    assert latest_checkpoint(tmp_path).path.name == "iter_0000001.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path).path)["iteration"] == 1


def test_damaged_newest_checkpoint_falls_back_to_the_previous_and_names_the_skipped_ones(tmp_path):
    for it in (1, 2, 3):
        save_checkpoint(_state(it), tmp_path, it)
    newest = tmp_path / "iter_0000003.pt"
    newest.write_bytes(newest.read_bytes()[:200])  # truncated (e.g. a copy cut short)
    found = load_latest_checkpoint(tmp_path, required=RESUME_KEYS)
    assert found.path.name == "iter_0000002.pt" and found.checkpoint["iteration"] == 2
    assert [d.path for d in found.damaged] == [newest] and "not a readable checkpoint" in found.damaged[0].error
    latest = latest_checkpoint(tmp_path)  # cli eval / load_model go through this
    assert latest.path.name == "iter_0000002.pt" and [d.path for d in latest.damaged] == [newest]

    # not a zip at all, and a readable file that lacks the keys a resume needs: both skipped
    (tmp_path / "iter_0000002.pt").write_bytes(b"garbage" * 10)
    torch.save({"model": {}, "format_version": FORMAT_VERSION}, tmp_path / "iter_0000004.pt")
    found = load_latest_checkpoint(tmp_path, required=RESUME_KEYS)
    assert found.path.name == "iter_0000001.pt"
    assert any("missing ['optimizer', 'iteration']" in d.error for d in found.damaged) and len(found.damaged) == 3

    for p in tmp_path.glob("iter_*.pt"):
        p.write_bytes(b"")
    found = load_latest_checkpoint(tmp_path)
    assert found.path is None and found.checkpoint is None and len(found.damaged) == 4


def test_candidates_put_the_pointer_first_then_newest_to_oldest(tmp_path):
    for it in (9, 10, 11):
        atomic_torch_save(_state(it), tmp_path / f"iter_{it:07d}.pt")
    (tmp_path / "latest.txt").write_text("iter_0000010.pt\n")
    names = [p.name for p in checkpoint_candidates(tmp_path)]
    assert names == ["iter_0000010.pt", "iter_0000011.pt", "iter_0000009.pt"]


def test_damaged_and_foreign_files_give_clear_errors(tmp_path):
    path = tmp_path / "iter_0000001.pt"
    atomic_torch_save({"model": {"a": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(path)
    foreign = tmp_path / "ref.pth"
    torch.save({"net": {}, "step": 3}, foreign)
    with pytest.raises(ValueError, match="emanet convert"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    future = tmp_path / "future.pt"
    torch.save({"model": {}, "format_version": FORMAT_VERSION + 1}, future)
    with pytest.raises(ValueError, match="newer"):
        load_checkpoint(future)


def test_latest_without_pointer_and_empty_folder(tmp_path):
    assert latest_checkpoint(tmp_path).path is None
    atomic_torch_save({"model": {}}, tmp_path / "iter_0000007.pt")
    assert latest_checkpoint(tmp_path).path.name == "iter_0000007.pt"


def test_checkpoint_names_parse_back_and_the_text_write_is_atomic(tmp_path):
    assert checkpoint_iteration(tmp_path / checkpoint_name(12)) == 12 and checkpoint_iteration("eval.json") == -1
    target = tmp_path / "latest.txt"
    write_text_atomic(target, "iter_0000012.pt\n")
    assert target.read_text() == "iter_0000012.pt\n" and [p.name for p in tmp_path.iterdir()] == ["latest.txt"]
    with pytest.raises(OSError) as failed:
        write_text_atomic(tmp_path / "missing" / "latest.txt", "x")
    assert failed.value.filename == str(tmp_path / "missing" / "latest.txt")


# ----------------------------------------------------------------------------- the one way to write a file


def test_atomic_path_replaces_the_file_with_an_ordinary_mode_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old")
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json"  # writers that read the extension still see it
        assert path.read_text() == "old"  # nothing visible before the block ends
        tmp.write_text("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_keeps_the_old_bytes_and_names_the_path(tmp_path, failure):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the previous export")
    with pytest.raises(type(failure)) as raised, atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise failure
    assert path.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    if isinstance(failure, OSError):
        assert raised.value.filename == str(path) and raised.value.strerror == "No space left on device"


def test_a_ctrl_c_while_the_temporary_is_made_leaves_no_temporary(tmp_path, monkeypatch):
    # the signal arrives the instant mkstemp has created the file, before atomic_path holds its name: it must be
    # delivered only once the name is held, so that the KeyboardInterrupt removes the file (found flaky under load
    # by tests/cli/test_interrupts.py, which leaves predict a .NAME.tmp.png)
    # (another thread running, as torch's pools and a full test run have: the process's signal may reach it)
    real, stop = tempfile.mkstemp, threading.Event()

    def mkstemp_then_ctrl_c(*args, **kwargs):
        made = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # time for the signal to be handled here, if it is not held
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_ctrl_c)
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        for _ in range(5):
            with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "label.png") as tmp:
                tmp.write_bytes(b"never")
    finally:
        stop.set()
        other.join()
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_folder_is_an_oserror_naming_the_target(tmp_path):
    with pytest.raises(OSError) as raised:
        write_bytes_atomic(tmp_path / "missing" / "x.png", b"png")
    assert raised.value.filename == str(tmp_path / "missing" / "x.png")


def test_text_and_bytes_writes_go_through_atomic_path(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "ünïcode")
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.txt").read_bytes() == "ünïcode".encode() and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_a_nested_write_keeps_the_name_of_the_file_that_failed(tmp_path):
    outer, inner = tmp_path / "model.safetensors", tmp_path / "config.json"
    with pytest.raises(OSError) as raised, atomic_path(outer), atomic_path(inner) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert raised.value.filename == str(inner) and sorted(tmp_path.iterdir()) == []


def test_a_name_near_the_file_system_limit_still_gets_a_temporary(tmp_path):
    path = tmp_path / ("x" * 250 + ".png")
    write_bytes_atomic(path, b"png")
    assert path.read_bytes() == b"png" and len(list(tmp_path.iterdir())) == 1
