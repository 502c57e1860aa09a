"""The command line: flops output, JSON, clean errors for bad arguments, and how the program exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from emanet.cli import main as cli
from emanet.cli.main import main


def test_flops_json(capsys):
    assert main(["flops", "--json", "--backbone", "resnet18", "--stem", "standard", "--size", "65", "65"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["backbone"] == "resnet18"
    assert out["cost"]["total"]["macs"] > out["cost"]["backbone"]["macs"] > 0
    assert out["table1"][0]["part"] == "ResNet-101 backbone"


def test_flops_table_prints_paper_comparison(capsys):
    assert main(["flops"]) == 0
    out = capsys.readouterr().out
    assert "Paper Table 1" in out and "190.6" in out and "non-local" in out


def test_bad_value_is_a_message_not_a_traceback(capsys):
    assert main(["flops", "--num-bases", "0"]) == 2
    err = capsys.readouterr().err
    assert "num_bases" in err and "Traceback" not in err


class Exited(Exception):
    pass


def test_program_exits_with_mains_code_and_torchrun_workers_skip_the_teardown(monkeypatch):
    calls = []

    def fake_exit_now(code):
        calls.append(code)
        raise Exited

    monkeypatch.setattr(cli, "exit_now", fake_exit_now)
    monkeypatch.setattr(sys, "argv", ["emanet", "flops", "--num-bases", "0"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:  # a plain process: a normal exit with main's code
        cli.run()
    assert e.value.code == 2 and calls == []
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun worker: the same code, through exit_now
    with pytest.raises(Exited):
        cli.run()
    assert calls == [2]


def test_exit_now_flushes_output_and_logging_and_skips_atexit(tmp_path):
    log = tmp_path / "log.txt"
    code = (
        "import atexit, logging, sys; from emanet.cli.main import exit_now\n"
        f"logging.basicConfig(filename={str(log)!r}, level=logging.INFO)\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "logging.info('logged line')\n"
        "print('buffered out', end=''); print('buffered err', end='', file=sys.stderr)\n"
        "exit_now(5)\n"
        "print('after')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered pipes, as in CI logs
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 5
    assert proc.stdout == "buffered out" and proc.stderr == "buffered err"
    assert "logged line" in log.read_text()
