"""Messages that name the file and say what is expected (issue 21, item 3), met as users meet them: the CLI in a
subprocess, its exit status, the message, no traceback, and every file written before byte-identical after.

Not-UTF-8 config and dataset files, duplicate YAML keys, an empty config, `convert` of random bytes or of an
emanet model, the advice after non-finite losses, and `--resume` past train.iterations."""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emanet.checkpoint import atomic_torch_save, load_checkpoint
from emanet.cli.main import main
from emanet.config import Config
from emanet.models.emanet import build_model
from emanet.pretrained import save_pretrained
from tests.conftest import run_cli as emanet
from tests.conftest import tiny_model, tiny_run

TINY = tiny_run("train.batch_size=2", "train.log_interval=1")

pytestmark = pytest.mark.usefixtures("one_thread")


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def said(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """stderr, after checking the exit status, that no traceback is printed and that every word is in it."""
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    for word in words:
        assert word in proc.stderr, (word, proc.stderr[-3000:])
    return proc.stderr


def train_two_iterations(run: Path) -> None:
    """A finished tiny run with a checkpoint at each of its two iterations (in this process)."""
    args = ["train", "--no-progress", *TINY, "train.iterations=2", "train.checkpoint_interval=1"]
    assert main([*args, f"train.out_dir={run}"]) == 0


# ----------------------------------------------------------------------------- files that are not UTF-8

NOT_UTF8 = {  # the bytes, the offset of the first one UTF-8 cannot decode
    "utf16": ("model:\n  num_classes: 3\n".encode("utf-16"), 0),
    "latin1": ('train:\n  out_dir: "r\xe9sum\xe9"\n'.encode("latin-1"), 20),
    "binary": (bytes([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0xFF]), 0),
}


@pytest.mark.parametrize("kind", sorted(NOT_UTF8))
def test_a_config_that_is_not_utf8_names_the_file_the_encoding_and_the_offset(tmp_path, kind):
    data, offset = NOT_UTF8[kind]
    config = tmp_path / f"{kind}.yaml"
    config.write_bytes(data)
    run = tmp_path / "run"
    proc = emanet("train", "--config", str(config), f"train.out_dir={run}")
    err = said(proc, 2, str(config), "not UTF-8", "UTF-8 is expected", f"at offset {offset}")
    assert "codec can't decode" not in err
    assert ("UTF-16" in err) == (kind == "utf16")  # the byte-order mark says which encoding it is
    assert config.read_bytes() == data and not run.exists()


@pytest.mark.parametrize("name", ["classes.txt", "palette.txt"])
def test_a_class_list_or_palette_that_is_not_utf8_names_the_file(make_folder, tmp_path, name):
    root, _ = make_folder(split="train", palette=[(0, 0, 0), (255, 0, 0), (0, 255, 0)])
    text = "sky\nroad\ncaf\xe9\n" if name == "classes.txt" else "0 0 0\n255 0 0\n0 255 0\n"
    (root / name).write_bytes(text.encode("latin-1" if name == "classes.txt" else "utf-16"))
    before = hashes(root)
    run = tmp_path / "run"
    args = [
        "model.num_classes=3",
        "data.dataset=folder",
        "data.options={}",
        f"data.root={root}",
        "data.train_split=train",
    ]
    proc = emanet("train", "--no-progress", *TINY, *args, "data.val_split=train", f"train.out_dir={run}")
    offset = 12 if name == "classes.txt" else 0
    said(proc, 2, str(root / name), "not UTF-8", "UTF-8 is expected", f"at offset {offset}")
    assert hashes(root) == before and not (run / "config.yaml").exists()


# ----------------------------------------------------------------------------- YAML keys and empty files


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("model:\n  num_classes: 3\ndata:\n  crop_size: 64\nmodel:\n  num_bases: 8\n", "'model'", "lines 1 and 5"),
        ("train:\n  iterations: 3\n  seed: 1\n  iterations: 5\n", "'iterations'", "lines 2 and 4"),
    ],
)
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, text, key, lines):
    config = tmp_path / "twice.yaml"
    config.write_text(text)
    run = tmp_path / "run"
    said(emanet("train", "--config", str(config), f"train.out_dir={run}"), 2, str(config), key, lines, "twice")
    assert not run.exists()


@pytest.mark.parametrize("text", ["", "# the settings will go here\n\n"])
def test_an_empty_config_is_refused_saying_what_it_would_mean(tmp_path, text):
    config = tmp_path / "empty.yaml"
    config.write_text(text)
    run = tmp_path / "run"
    proc = emanet("train", "--config", str(config), f"train.out_dir={run}")
    said(proc, 2, str(config), "empty", "VOC defaults", "leave out --config")
    assert not run.exists()


# ----------------------------------------------------------------------------- every config problem at once

THREE_MISTAKES = {"train.iteratons": "5", "optim.momentun": "0.9", "optim.lr": "-1"}  # two misspelled, one bad


@pytest.mark.parametrize("given", ["yaml", "overrides"])
def test_two_misspelled_keys_and_a_bad_value_are_all_named_in_one_message(tmp_path, given):
    run = tmp_path / "run"
    if given == "yaml":
        config = tmp_path / "three.yaml"
        config.write_text("train:\n  iteratons: 5\noptim:\n  momentun: 0.9\n  lr: -1\n")
        args = ["--config", str(config)]
    else:
        args = [f"{k}={v}" for k, v in THREE_MISTAKES.items()]
    proc = emanet("train", *args, f"train.out_dir={run}")
    said(
        proc,
        2,
        "3 config problems",
        "unknown config key 'train.iteratons'; did you mean 'train.iterations'?",
        "unknown config key 'optim.momentun'; did you mean 'optim.momentum'?",
        "optim.lr must be > 0, got -1",
    )
    assert not run.exists()


# ----------------------------------------------------------------------------- out of memory

CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "3221225472 bytes. Error code 12 (Cannot allocate memory)"
)


def train_running_out_of_memory(run: Path, when: str, *extra: str) -> subprocess.CompletedProcess:
    """`emanet train` (the program's own entry point) in a subprocess whose model forward raises the CPU
    allocator's error in training (when="train") or in the final evaluation (when="eval")."""
    program = (
        "import sys\n"
        "from emanet.models.emanet import SegmentationModel\n"
        "forward = SegmentationModel.forward\n"
        "def failing(self, x):\n"
        f"    if self.training == {when == 'train'}:\n"
        f"        raise RuntimeError({CPU_OOM!r})\n"
        "    return forward(self, x)\n"
        "SegmentationModel.forward = failing\n"
        "from emanet.cli.main import run\n"
        "run()\n"
    )
    args = ["train", "--no-progress", *TINY, "train.iterations=1", *extra, f"train.out_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, timeout=300, env=env)


def test_training_out_of_memory_says_what_it_tried_and_what_to_lower(tmp_path):
    proc = train_running_out_of_memory(tmp_path / "run", "train", "train.batch_size=4", "train.accum_steps=2")
    said(
        proc,
        2,
        "emanet train: error: out of memory at iteration 1 on cpu: a micro-batch of 4 image(s) of 32x32 in fp32",
        "DefaultCPUAllocator: can't allocate memory",
        "train.batch_size with train.accum_steps raised to keep the global batch of 8 "
        "(e.g. train.batch_size=2 train.accum_steps=4)",
        "data.crop_size (now 32)",
        "train.precision=bf16",
        "meant for GPUs",
    )


def test_evaluation_out_of_memory_says_what_it_tried_and_what_to_lower(tmp_path):
    proc = train_running_out_of_memory(tmp_path / "run", "eval")
    said(
        proc,
        2,
        "emanet train: error: out of memory evaluating image 0 (32x32) with eval.mode=whole",
        "in fp32 on cpu (",
        "eval.mode=slide with eval.crop_size and eval.stride",
    )


# ----------------------------------------------------------------------------- convert


@pytest.fixture
def model_folder(tmp_path) -> Path:
    cfg = Config(model=tiny_model())
    cfg.data.dataset = "synthetic"
    return save_pretrained(build_model(cfg.model), cfg, tmp_path / "model")


@pytest.mark.parametrize("content", [bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8)), b""])
def test_convert_of_random_bytes_is_not_a_checkpoint_and_gives_no_pickle_advice(tmp_path, content):
    src = tmp_path / "download.pth"
    src.write_bytes(content)
    dst = tmp_path / "out"
    err = said(emanet("convert", "--from", "reference", str(src), str(dst)), 2, str(src), "not a PyTorch checkpoint")
    assert "allow-pickle" not in err and "pickled" not in err and not dst.exists() and src.read_bytes() == content


def test_convert_keeps_the_pickle_advice_for_a_real_pickle(tmp_path):
    src = tmp_path / "mmseg.pth"  # objects outside the state dict are read as stubs; inside, they need the flag
    torch.save({"state_dict": {"w": argparse.Namespace(hub=1)}, "meta": {}}, src)
    said(emanet("convert", "--from", "mmseg", str(src), str(tmp_path / "out")), 2, str(src), "--allow-pickle")


@pytest.mark.parametrize("given", ["folder", "weights"])
def test_convert_of_an_emanet_model_says_it_is_one(model_folder, tmp_path, given):
    src = model_folder if given == "folder" else model_folder / "model.safetensors"
    before = hashes(model_folder)
    dst = tmp_path / "out"
    proc = emanet("convert", "--from", "reference", str(src), str(dst))
    err = said(proc, 2, str(src), "already an emanet model", "predict/eval/export")
    assert "not recognised" not in err and not dst.exists() and hashes(model_folder) == before


# ----------------------------------------------------------------------------- advice after non-finite losses


def test_skip_mode_is_not_told_to_set_skip_and_no_checkpoint_means_start_over(tmp_path):
    run = tmp_path / "run"
    settings = ["train.on_nonfinite=skip", "train.max_consecutive_skips=2", "train.checkpoint_interval=100"]
    proc = emanet(
        "train", "--no-progress", *TINY, "train.iterations=6", "optim.lr=1e38", *settings, f"train.out_dir={run}"
    )
    err = said(proc, 4, "2 consecutive non-finite losses", "no checkpoint is usable (none is kept)", "--overwrite")
    assert "train.max_consecutive_skips (now 2)" in err and "a lower optim.lr (now 1e+38)" in err
    assert "on_nonfinite=skip" not in err.replace("(train.max_consecutive_skips=2)", "")
    assert "--resume-from" not in err


def test_when_every_kept_checkpoint_is_non_finite_none_is_offered(tmp_path):
    run = tmp_path / "run"
    train_two_iterations(run)
    for path in sorted(run.glob("iter_*.pt")):  # weights already broken when saved
        ckpt = load_checkpoint(path)
        ckpt["model"] = {k: v.float().fill_(math.nan) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
        ckpt["param_norm"] = math.nan
        atomic_torch_save(ckpt, path)
    proc = emanet("train", "--no-progress", *TINY, "train.iterations=4", f"train.out_dir={run}", "--resume")
    err = said(proc, 4, "non-finite loss", "no checkpoint is usable (each is unreadable or has non-finite weights)")
    assert "--overwrite" in err and "train.on_nonfinite=skip" in err and "--resume-from" not in err


# ----------------------------------------------------------------------------- --resume past train.iterations


@pytest.fixture
def two_iterations(tmp_path) -> Path:
    run = tmp_path / "run"
    train_two_iterations(run)
    return run


@pytest.mark.parametrize("flag", ["--resume", "--resume-from"])
def test_resume_past_train_iterations_is_refused_and_changes_nothing(two_iterations, flag):
    run, before = two_iterations, hashes(two_iterations)
    args = [flag] if flag == "--resume" else [flag, str(run / "iter_0000002.pt")]
    proc = emanet("train", "--no-progress", *TINY, "train.iterations=1", f"train.out_dir={run}", *args)
    said(proc, 2, f"{flag}: the run is already at iteration 2", ">= train.iterations=1", "raise train.iterations")
    assert hashes(run) == before


def test_resume_of_a_complete_run_says_only_the_final_evaluation_runs(two_iterations):
    run = two_iterations
    checkpoints = {k: v for k, v in hashes(run).items() if k.startswith("iter_")}
    proc = emanet("train", "--no-progress", *TINY, "train.iterations=2", f"train.out_dir={run}", "--resume")
    said(proc, 0, "already at iteration 2 = train.iterations", "only the final evaluation runs again")
    assert {k: v for k, v in hashes(run).items() if k.startswith("iter_")} == checkpoints


# ----------------------------------------------------------------------------- the dataset a config names


def test_train_without_a_dataset_root_says_which_key_to_set(tmp_path):
    # the packaged VOC recipe names no root: a newcomer's first `emanet train` (a traceback since the CLI
    # catches only user errors)
    said(emanet("train", f"train.out_dir={tmp_path / 'r'}", "data.root=null"), 2, "data.root", "needs a root folder")
    said(
        emanet("train", "data.dataset=nope", f"train.out_dir={tmp_path / 'r'}"),
        2,
        "data.dataset must be one of",
        "got 'nope'",
    )
    assert [p.name for p in (tmp_path / "r").iterdir()] == [".lock"]  # nothing of a run was written


def test_backbone_weights_that_cannot_be_read_are_a_message(tmp_path):
    bad = tmp_path / "r50.pth"
    bad.write_bytes(b"\x00not a checkpoint")
    proc = emanet("train", *TINY, f"model.pretrained_backbone={bad}", f"train.out_dir={tmp_path / 'r'}")
    said(proc, 2, str(bad))
