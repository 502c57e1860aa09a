"""The command line: the parser built from the subcommand modules, flops output, the error boundary (a
UserError is a message, an early stop of training its message and status, a signal one line and 130, anything
else a traceback), the log handler and its -q/-v, and how the program exits."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import types
import warnings

import pytest

import emanet.cli.configs
import emanet.cli.demo
from emanet.cli import main as cli
from emanet.cli.main import main
from emanet.errors import ConfigError
from emanet.train.loop import NonFiniteLoss, TrainingInterrupted


def test_every_subcommand_is_bound_to_the_handler_of_its_module():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    names = ["configs", "flops", "train", "eval", "demo", "predict", "study", "push-to-hub", "bench", "check-data"]
    assert list(sub.choices) == [*names, "convert", "export"]  # `emanet --help` lists them in this order
    for name, p in sub.choices.items():
        module = {"eval": "evaluate"}.get(name, name.replace("-", "_"))
        assert p.get_default("func").__module__ == f"emanet.cli.{module}", name
    bench = sub.choices["bench"]
    suites = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    assert {n: p.get_default("func").__name__ for n, p in suites.choices.items()} == {
        "gpu": "run_gpu",
        "onnx": "run_onnx",
        "int8": "run_int8",
    }


def test_a_subcommand_without_a_handler_is_refused_when_the_parser_is_built():
    forgetful = types.SimpleNamespace(register=lambda sub: sub.add_parser("extra"))
    with pytest.raises(TypeError, match="emanet extra"):
        cli.build_parser([*cli.COMMANDS, forgetful])


def test_bench_runs_the_cpu_suite_and_names_the_others_as_sub_choices():
    parser = cli.build_parser()
    cpu = parser.parse_args(["bench", "--out", "x", "--parts", "em", "--quick"])
    assert (cpu.func.__name__, cpu.out, cpu.parts, cpu.quick) == ("run_cpu", "x", ["em"], True)
    gpu = parser.parse_args(["bench", "gpu", "--dry-run", "--out", "y", "--budget-s", "5"])
    assert (gpu.func.__name__, gpu.out, gpu.dry_run, gpu.budget_s) == ("run_gpu", "y", True, 5.0)
    onnx = parser.parse_args(["bench", "onnx", "--quick", "--threads", "2"])
    assert (onnx.func.__name__, onnx.out, onnx.quick, onnx.threads) == ("run_onnx", "benchmarks", True, 2)


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


def test_a_user_error_is_a_message_and_exit_2(monkeypatch, capsys):
    def refuse(args):
        raise ConfigError("--show takes a recipe name")

    monkeypatch.setattr(emanet.cli.configs, "run", refuse)
    assert main(["configs"]) == 2
    assert capsys.readouterr().err == "emanet configs: error: --show takes a recipe name\n"


def test_a_file_error_names_the_path_and_the_reason(monkeypatch, capsys, tmp_path):
    def read(args):
        (tmp_path / "missing.yaml").read_text()

    monkeypatch.setattr(emanet.cli.configs, "run", read)
    assert main(["configs"]) == 2
    assert capsys.readouterr().err == f"emanet configs: error: {tmp_path / 'missing.yaml'}: No such file or directory\n"


def test_any_other_error_is_a_bug_and_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ValueError("an internal shape mismatch")

    monkeypatch.setattr(emanet.cli.configs, "run", broken)
    with pytest.raises(ValueError, match="internal shape mismatch"):  # not turned into a message
        main(["configs"])


def test_an_early_stop_of_training_from_any_command_is_said_once_on_rank_0_with_its_status(monkeypatch, capsys):
    stops = []

    def stopped(args):
        raise stops.pop(0)

    monkeypatch.setattr(emanet.cli.configs, "run", stopped)
    stop = dict(iteration=7, checkpoint="run/iter_0000007.pt", advice="continue with --resume")
    stops.append(TrainingInterrupted("stopped at iteration 7 (signal 2); checkpoint run/iter_0000007.pt", **stop))
    assert main(["configs"]) == 3
    said = "stopped at iteration 7 (signal 2); checkpoint run/iter_0000007.pt; continue with --resume"
    assert capsys.readouterr().err == f"emanet configs: {said}\n"
    stops.append(NonFiniteLoss("non-finite loss", iteration=7, checkpoint=None, rank=1))  # another rank: silent
    assert main(["configs"]) == 4 and capsys.readouterr().err == ""
    already = TrainingInterrupted("stopped", **stop)
    already.reported = True  # said by emanet train before the ranks met
    stops.append(already)
    assert main(["configs"]) == 3 and capsys.readouterr().err == ""


def test_a_signal_stopping_training_inside_a_command_that_does_not_resume_is_130(monkeypatch, capsys):
    def demo(args):  # `emanet demo` trains its models afresh each time: nothing to continue
        stop = TrainingInterrupted("stopped at iteration 3 (signal 15); checkpoint x", iteration=3, checkpoint="x")
        stop.signum = signal.SIGTERM
        raise stop

    monkeypatch.setattr(emanet.cli.demo, "run", demo)
    assert main(["demo", "--out", "never-written"]) == 130
    assert capsys.readouterr().err.startswith("emanet demo: interrupted by SIGTERM;")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_command_unwinds_it_and_is_one_line_and_130(monkeypatch, capsys, signum):
    unwound = []

    def working(args):
        try:
            os.kill(os.getpid(), signum)  # handled at the next bytecode: raised here, in the main thread
            raise AssertionError("the signal did not stop the command")
        finally:
            unwound.append(True)  # a `with atomic_path(...)` block would remove its temporary here

    monkeypatch.setattr(emanet.cli.configs, "run", working)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert main(["configs"]) == 130 and unwound == [True]
    name = signal.Signals(signum).name + (" (Ctrl-C)" if signum == signal.SIGINT else "")
    assert capsys.readouterr().err == (
        f"emanet configs: interrupted by {name}; files already written are complete, nothing half-written is kept\n"
    )
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # restored


def test_whatever_a_signal_causes_on_the_way_out_is_reported_as_the_signal(monkeypatch, capsys):
    def working(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:  # e.g. a DataLoader worker killed by the same signal, noticed while unwinding
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated") from None

    monkeypatch.setattr(emanet.cli.configs, "run", working)
    assert main(["configs"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("emanet configs: interrupted by SIGTERM;") and "DataLoader" not in err


def test_help_lists_every_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for status in ("0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "130 "):
        assert f"\n  {status}" in out, status
    assert "stopped by SIGINT/SIGTERM" in out


def test_a_bare_emanet_prints_the_help_on_stdout_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "emanet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: emanet") and "train " in proc.stdout and "examples:" in proc.stdout


def every_parser():
    parser = cli.build_parser()
    return [("", parser), *cli._sub_parsers(parser)]


@pytest.mark.parametrize("name, parser", every_parser()[1:], ids=lambda x: x if isinstance(x, str) else "")
def test_every_subcommands_help_says_what_it_does_and_shows_an_example(name, parser):
    text = parser.format_help()
    assert parser.description and parser.description.endswith(".")
    examples = text.split("examples:\n", 1)[1].splitlines()
    assert any(f"emanet {name} " in line or line.endswith(f"emanet {name}") for line in examples), examples


def test_every_flag_and_argument_of_every_command_has_help_text():
    missing = []
    for name, parser in every_parser():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"emanet {name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


@pytest.mark.parametrize(
    ("error", "code", "traceback"),
    [("emanet.errors.UserError('fix the flag')", 2, False), ("ValueError('a bug')", 1, True)],
)
def test_the_program_exits_2_on_a_user_error_and_1_with_a_traceback_on_a_bug(error, code, traceback):
    program = (
        "import emanet.cli.configs, emanet.errors\n"
        "def run(args):\n"
        f"    raise {error}\n"
        "emanet.cli.configs.run = run\n"
        "from emanet.cli.main import run\n"
        "run()\n"
    )
    proc = subprocess.run([sys.executable, "-c", program, "configs"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr
    assert ("Traceback" in proc.stderr) is traceback, proc.stderr
    assert ("fix the flag" if code == 2 else "ValueError: a bug") in proc.stderr


@pytest.mark.parametrize(
    ("flags", "shown"),
    [([], ["info", "warning"]), (["-q"], ["warning"]), (["--verbose"], ["debug", "info", "warning"])],
)
def test_log_lines_go_to_stderr_through_the_progress_writer_at_the_chosen_level(monkeypatch, capsys, flags, shown):
    def chatty(args):
        log = logging.getLogger("emanet.cli.configs")
        log.debug("debug")
        log.info("info")
        log.warning("warning")
        print("result")
        return 0

    written = []
    monkeypatch.setattr(emanet.cli.configs, "run", chatty)
    monkeypatch.setattr(cli, "write", lambda message, stream: written.append(message) or print(message, file=stream))
    handlers = list(logging.getLogger("emanet").handlers)
    assert main([*flags, "configs"]) == 0
    out, err = capsys.readouterr()
    assert out == "result\n" and err.splitlines() == shown and written == shown  # plain "%(message)s" lines
    assert logging.getLogger("emanet").handlers == handlers  # removed again: a second main() logs once
    assert main(["configs", *flags]) == 0  # the flags also after the command
    assert capsys.readouterr().err.splitlines() == shown


def test_a_warning_raised_twice_is_shown_once(monkeypatch, capsys):
    def twice(args):  # as torch's DataLoader does: the same text from two call sites
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("too many workers", UserWarning, stacklevel=1)
            warnings.warn("too many workers", UserWarning, stacklevel=1)
            warnings.warn("another one", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(emanet.cli.configs, "run", twice)
    assert main(["configs"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "emanet configs: warning: too many workers",
        "emanet configs: warning: another one",
    ]


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
