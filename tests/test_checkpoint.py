"""Checkpoint files: atomic writes, the latest pointer, keeping k, clear errors for damaged files."""

from __future__ import annotations

import pytest
import torch

from emanet.checkpoint import atomic_torch_save, latest_checkpoint, load_checkpoint, save_checkpoint


def test_save_keeps_the_newest_k_and_points_at_the_latest(tmp_path):
    for it in (1, 2, 3, 4):
        save_checkpoint({"model": {"w": torch.tensor([float(it)])}, "iteration": it}, tmp_path, it, keep=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*.pt")) == ["iter_0000003.pt", "iter_0000004.pt"]
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "iter_0000004.pt"
    ckpt = load_checkpoint(latest)
    assert ckpt["iteration"] == 4 and ckpt["format_version"] == 1 and ckpt["model"]["w"].item() == 4.0
    assert not list(tmp_path.glob("*.tmp"))


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


def test_latest_without_pointer_and_empty_folder(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    atomic_torch_save({"model": {}}, tmp_path / "iter_0000007.pt")
    assert latest_checkpoint(tmp_path).name == "iter_0000007.pt"
