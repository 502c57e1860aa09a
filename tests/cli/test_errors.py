"""Small user mistakes through the CLI: each a message naming what is wrong, exit 2 and no traceback."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from emanet.cli.main import main
from tests.conftest import run_cli as emanet
from tests.conftest import tiny_run

TINY = tiny_run("train.batch_size=2", length=4, val_length=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in proc.stderr, (word, proc.stderr[-3000:])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_more_classes_than_labels_hold_names_num_classes(tmp_path):
    proc = emanet("train", *TINY, "model.num_classes=300", f"train.out_dir={tmp_path / 'run'}")
    refused(proc, "model.num_classes must be at most 255", "got 300")
    assert "ignore_index" not in proc.stderr


def test_a_yaml_file_whose_top_level_is_a_list_names_the_file(tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- model\n- data\n")
    refused(emanet("train", "--config", str(config)), str(config), "top level must be a mapping", "got a list")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--no-progress", *TINY, "train.iterations=1", f"train.out_dir={run}"]) == 0
    return run


def test_a_run_folder_whose_only_checkpoint_is_damaged_is_one_message(trained, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    data = (trained / "iter_0000001.pt").read_bytes()
    (run / "iter_0000001.pt").write_bytes(data[: len(data) // 3])  # a truncated copy
    refused(emanet("eval", str(run), "--no-progress"), "no readable checkpoint", str(run / "iter_0000001.pt"))
    assert "UserWarning" not in emanet("eval", str(run)).stderr


def test_convert_of_an_emanet_checkpoint_says_it_needs_no_conversion(trained, tmp_path):
    ckpt = trained / "iter_0000001.pt"
    before = digest(ckpt)
    proc = emanet("convert", "--from", "reference", str(ckpt), str(tmp_path / "out"))
    refused(proc, "already an emanet checkpoint", "emanet eval/predict/export")
    assert not (tmp_path / "out").exists() and digest(ckpt) == before


def test_fp16_on_cpu_is_refused_before_data_or_model_are_built(tmp_path, trained):
    run = tmp_path / "run"
    # the data root does not exist: a later check would complain about it instead
    proc = emanet(
        "train",
        "--precision",
        "fp16",
        *TINY,
        "data.dataset=folder",
        f"data.root={tmp_path / 'none'}",
        f"train.out_dir={run}",
        "data.options={}",
    )
    refused(proc, "precision fp16 needs CUDA", "bf16")
    assert not run.exists()
    refused(emanet("eval", str(trained), "--precision", "fp16", "--device", "cpu"), "precision fp16 needs CUDA")
