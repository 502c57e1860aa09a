"""The `emanet` program: the parser built from the subcommand modules, the log handler, the error boundary.

Each subcommand is one module of this package holding its parser and its handler side by side: its
``register(sub)`` adds the sub-parser and binds the handler with ``set_defaults(func=...)``. ``main`` parses,
installs the one log handler and the interrupt policy, and runs the handler; a UserError or a file error is a
message and exit code 2, an early stop of training (TrainingStopped) its message and its own status, SIGINT
or SIGTERM one line and 130 (3 where a rerun continues what was saved); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType

from emanet import __version__
from emanet.cli import (
    bench,
    check_data,
    configs,
    convert,
    demo,
    evaluate,
    export,
    flops,
    predict,
    push_to_hub,
    study,
    train,
)
from emanet.errors import ConfigError, UserError
from emanet.progress import write
from emanet.train.loop import TrainingInterrupted
from emanet.train.setup import TrainingStopped
from emanet.train.stops import signal_name

# in the order `emanet --help` lists them
COMMANDS = (configs, flops, train, evaluate, demo, predict, study, push_to_hub, bench, check_data, convert, export)

EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM with nothing to continue from: 128 + SIGINT, what a shell shows for Ctrl-C
EXIT_RESUMABLE = 3  # SIGINT/SIGTERM after saving what a rerun continues from (emanet.train.loop.EXIT_INTERRUPTED)
# commands that keep what they finished, and how to continue after a signal (train: its own StopSignals)
RESUMABLE = {"study": "what was finished is kept: run the same command again to continue"}
EXAMPLES = """examples:
  emanet configs                                   the packaged recipes; --keys: every config key
  emanet train --config synthetic_toy train.out_dir=runs/toy
  emanet eval runs/toy
  emanet predict runs/toy photo.jpg --out preds/
  emanet COMMAND --help                            a command's flags and examples"""
EXIT_STATUSES = """exit status:
  0    done
  1    some inputs failed or problems were found (predict, check-data)
  2    a usage, config, path or run-folder error, a failed write, a failed export --check (nothing
       written), or out of memory; the message says what to fix (out of memory: which settings to lower)
  3    stopped by SIGINT/SIGTERM after saving what a rerun continues from (train: a checkpoint,
       continue with --resume; study: run the same command again)
  4    train: non-finite loss; continue from a checkpoint you trust with --resume-from
  5    train under torchrun: another process was lost; continue with --resume
  130  stopped by SIGINT/SIGTERM; files already written are complete, nothing half-written is kept
  a second SIGINT/SIGTERM ends a command at once; a traceback is a bug"""


def _add_verbosity(p: argparse.ArgumentParser, default=None) -> None:
    """-q/--quiet and -v/--verbose; a sub-parser's default SUPPRESS keeps what was given before the command."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", default=default, help="log warnings and errors only")
    g.add_argument("-v", "--verbose", action="store_true", default=default, help="log debug messages too")


def _sub_parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every sub-parser below ``parser`` (`emanet bench gpu` too), with its command line's words."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, p in action.choices.items():
                yield name, p
                yield from ((f"{name} {inner}", q) for inner, q in _sub_parsers(p))


def build_parser(commands: Sequence[ModuleType] = COMMANDS) -> argparse.ArgumentParser:
    """The `emanet` parser: each module of ``commands`` registers its sub-parser, bound to its handler."""
    parser = argparse.ArgumentParser(
        prog="emanet",
        description="EMANet semantic segmentation",
        epilog=f"{EXAMPLES}\n\n{EXIT_STATUSES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"emanet {__version__}")
    _add_verbosity(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # none given: the help (main)
    for command in commands:
        before = set(sub.choices)
        command.register(sub)
        for name in set(sub.choices) - before:  # the module's parser and any below it: its EXAMPLE as epilog
            for p in (sub.choices[name], *(q for _, q in _sub_parsers(sub.choices[name]))):
                p.epilog = p.epilog or getattr(command, "EXAMPLE", None)
    for name, p in _sub_parsers(parser):
        if p.get_default("func") is None:
            raise TypeError(f"`emanet {name}` has no handler: its register() must call set_defaults(func=...)")
        _add_verbosity(p, default=argparse.SUPPRESS)
        p.formatter_class = argparse.RawDescriptionHelpFormatter  # the example's lines as written
    for action in _subparser_actions(parser):  # `emanet train --help` opens with what `emanet --help` says of it
        for choice in action._choices_actions:
            p = action.choices[choice.dest]
            p.description = p.description or textwrap.fill(choice.help[:1].upper() + choice.help[1:] + ".", 100)
    return parser


def _subparser_actions(parser: argparse.ArgumentParser) -> Iterator[argparse._SubParsersAction]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield action
            for p in action.choices.values():
                yield from _subparser_actions(p)


class _LineHandler(logging.Handler):
    """Each record as one plain line on stderr, written past a live progress bar (emanet.progress.write)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write(self.format(record), stream=sys.stderr)
        except Exception:  # logging's own contract: a failing handler reports and carries on
            self.handleError(record)


@contextlib.contextmanager
def _logging_to_stderr(args: argparse.Namespace) -> Iterator[None]:
    """The one handler on the "emanet" logger while a command runs: INFO, WARNING with -q, DEBUG with -v.
    Removed afterwards, so calling ``main`` again (tests, notebooks) does not print every line twice."""
    logger = logging.getLogger("emanet")
    handler = _LineHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level_before = logger.level
    logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    logger.addHandler(handler)

    shown: set[str] = set()

    def show_warning(message, category, filename, lineno, file=None, line=None):  # no source line
        text = f"emanet {args.command}: warning: {message}"
        if text not in shown:  # once per command: torch's DataLoader warns from two call sites, for example
            shown.add(text)
            write(text, stream=sys.stderr)

    shown_before, warnings.showwarning = warnings.showwarning, show_warning
    try:
        yield
    finally:
        warnings.showwarning = shown_before
        logger.removeHandler(handler)
        logger.setLevel(level_before)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command, raised in the main thread: every ``with`` block unwinds on the way
    out (an atomic write removes its temporary file, the target keeps its bytes)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


class _Interrupts:
    """While a command runs, the first SIGINT or SIGTERM raises Interrupted (training swaps in its own
    StopSignals, which save a checkpoint first); a second one ends the process at once (the default action).
    The previous handlers come back on exit; outside the main thread nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        raise Interrupted(signum)

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)  # None: installed outside Python


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`emanet eval RUN --device cpu eval.flip=true`)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _check_overrides(overrides: list[str]) -> None:
    """Each override is one word, section.key=value: `train.iterations 1000` or a lone `train.iterations` is
    refused saying so, before any work (argparse would only call it an unrecognized argument)."""
    for i, item in enumerate(overrides):
        if "=" in item:
            continue
        value = overrides[i + 1] if i + 1 < len(overrides) and "=" not in overrides[i + 1] else "VALUE"
        example = f"{item}={value}" if "." in item else "train.iterations=1000"
        raise ConfigError(f"override {item!r} has no '=': give each as one word section.key=value (e.g. {example})")


def _stop_message(command: str, e: TrainingStopped) -> str:
    if command in RESUMABLE and e.advice:  # not train's --resume: the command's own way to continue
        return f"{e.reason}; {RESUMABLE[command]}"
    return str(e)


def _run(args: argparse.Namespace) -> int:
    """The command's handler behind the error boundary: UserError and OSError are a message and status 2, an
    early stop of training its message (said once) and its own status."""
    try:
        _check_overrides(getattr(args, "overrides", []))
        return args.func(args)
    except TrainingStopped as e:  # train, study, demo: run folder 2, signal 3, non-finite loss 4, lost peer 5
        if isinstance(e, TrainingInterrupted) and e.signum and args.command not in ("train", *RESUMABLE):
            return _interrupted(args.command, e.signum)  # demo: a rerun starts afresh, nothing continues
        if e.speaks and not e.reported:
            print(f"emanet {args.command}: {_stop_message(args.command, e)}", file=sys.stderr, flush=True)
        return e.exit_code
    except UserError as e:  # a mistake the user can fix: the message says how, no traceback
        print(f"emanet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing file, a read-only folder, a full disk: the path and the OS reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"emanet {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    # anything else is a bug: it propagates with its traceback (exit status 1)


def _interrupted(command: str, signum: int) -> int:
    """One line for a command stopped by SIGINT/SIGTERM, and its status: 3 where a rerun continues, else 130."""
    name = signal_name(signum) + (" (Ctrl-C)" if signum == signal.SIGINT else "")
    if command in RESUMABLE:
        print(f"emanet {command}: interrupted by {name}; {RESUMABLE[command]}", file=sys.stderr, flush=True)
        return EXIT_RESUMABLE
    print(
        f"emanet {command}: interrupted by {name}; files already written are complete, nothing half-written is kept",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if args.command is None:  # a bare `emanet` (as pip and docker do): the help on stdout, and 0
        parser.print_help()
        return 0
    with _logging_to_stderr(args), _Interrupts() as interrupts:
        try:
            return _run(args)
        except BaseException:
            if interrupts.received is None:
                raise
            # Interrupted itself, or what it caused on the way out (a DataLoader worker killed by the same
            # signal, a write cut short): the signal is the reason
            return _interrupted(args.command, interrupts.received)


def run() -> None:
    """The `emanet` program: ``main``'s exit code; a torchrun worker leaves without interpreter teardown.

    DistributedDataParallel keeps its process group alive after ``destroy_process_group`` (torch 2.13: the
    gloo group's three threads are still running when the interpreter finalizes), and finalizing around
    them can abort a worker ("terminate called without an active exception", SIGABRT) after a run that
    finished well, which torchrun then reports as a failed job. Every file is closed by then; output and
    logging are flushed, then the worker ends with ``os._exit``. A plain process exits normally.
    """
    try:
        code = main()
    except KeyboardInterrupt:  # a Ctrl-C just before or after the command's own handling: no traceback
        code = EXIT_INTERRUPTED
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_now(code)
    raise SystemExit(code)


def exit_now(code: int) -> None:
    """Flush stdout, stderr and logging, then end the process with ``code`` (no atexit, no finalization)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            stream.flush()
    os._exit(code)
