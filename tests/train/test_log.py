"""What a run records: metrics.jsonl, and the same scalars to the loggers train.loggers names (TensorBoard,
Weights & Biases in offline mode here); a logger that is not installed is said once (tensorboard) or refused
before any work (wandb)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from emanet.cli.main import main
from emanet.config import Logger
from emanet.errors import install_hint
from emanet.train.log import LOGGERS
from tests.conftest import tiny_run

TINY = tiny_run("train.batch_size=2", "train.iterations=4", "train.log_interval=2", "train.checkpoint_interval=4")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_value_of_train_loggers_has_a_writer():
    assert set(LOGGERS) == set(typing.get_args(Logger))


def test_a_missing_tensorboard_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec gives None
    run = tmp_path / "run"
    assert main(["train", "--no-progress", *TINY, "train.loggers=[tensorboard]", f"train.out_dir={run}"]) == 0
    err = capsys.readouterr().err
    assert err.count("tensorboard is not installed") == 1, err
    assert install_hint("tensorboard") in err and (run / "metrics.jsonl").is_file() and not (run / "tb").exists()


def test_no_logger_asked_for_means_no_warning_and_no_tb(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--no-progress", *TINY, f"train.out_dir={run}"]) == 0
    assert "not installed" not in capsys.readouterr().err and not (run / "tb").exists()


def test_a_missing_wandb_is_refused_before_any_work_naming_the_extra(tmp_path):
    run = tmp_path / "run"
    program = "import sys\nsys.modules['wandb'] = None\nfrom emanet.cli.main import run\nrun()\n"
    args = ["train", *TINY, "train.loggers=[wandb]", f"train.out_dir={run}"]
    proc = subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "train.loggers has wandb, but wandb is not installed" in proc.stderr
    assert install_hint("wandb") in proc.stderr and not run.exists()


def wandb_history(path: Path) -> list[dict[str, str]]:
    """The history rows of an offline wandb run file: a 7-byte W&B header, then LevelDB log records (32 KiB
    blocks, each record a 7-byte header: crc, length, type 1 full / 2 first / 3 middle / 4 last) holding
    protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, part = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            records.append(part)
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_wandb_offline_logs_the_scalars_of_metrics_jsonl(tmp_path):
    pytest.importorskip("wandb")
    run, logs = tmp_path / "run", tmp_path / "wandb"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(logs)}
    args = [sys.executable, "-m", "emanet", "train", "--no-progress", *TINY, "train.loggers=[wandb]"]
    proc = subprocess.run([*args, f"train.out_dir={run}"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    (file,) = logs.glob("wandb/offline-run-*/run-*.wandb")
    logged = {}
    for row in wandb_history(file):
        logged.setdefault(int(row["_step"]), {}).update({k: json.loads(v) for k, v in row.items() if "/" in k})
    expected = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        values = {f"{record['kind']}/{k}": v for k, v in record.items() if k not in ("kind", "iter")}
        expected.setdefault(record["iter"], {}).update(values)
    assert sorted(logged) == [2, 4] and logged == expected


def test_a_resume_may_add_a_logger(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--no-progress", *TINY, f"train.out_dir={run}"]
    assert main([*args, "train.iterations=2", "train.checkpoint_interval=2"]) == 0
    assert main([*args, "--resume", "train.loggers=[tensorboard]"]) == 0, capsys.readouterr().err


def test_wandb_without_a_login_is_one_warning_saying_how_to_log_in_and_the_run_goes_on(tmp_path):
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="online", HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "cfg"))
    run = tmp_path / "run"
    args = [sys.executable, "-m", "emanet", "train", "--no-progress", *TINY, "train.loggers=[wandb]"]
    proc = subprocess.run(
        [*args, f"train.out_dir={run}"], capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("wandb could not start a run: ") == 1 and "WANDB_MODE=offline" in proc.stderr
    assert (run / "eval.json").is_file()
