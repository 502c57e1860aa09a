"""The `emanet` program: the parser built from the subcommand modules, the log handler, the error boundary.

Each subcommand is one module of this package holding its parser and its handler side by side: its
``register(sub)`` adds the sub-parser and binds the handler with ``set_defaults(func=...)``. ``main`` parses,
installs the one log handler and runs the handler; a UserError or a file error is a message and exit code 2,
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
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
from emanet.errors import UserError
from emanet.progress import write

# in the order `emanet --help` lists them
COMMANDS = (configs, flops, train, evaluate, demo, predict, study, push_to_hub, bench, check_data, convert, export)


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
    parser = argparse.ArgumentParser(prog="emanet", description="EMANet semantic segmentation")
    parser.add_argument("--version", action="version", version=f"emanet {__version__}")
    _add_verbosity(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands:
        command.register(sub)
    for name, p in _sub_parsers(parser):
        if p.get_default("func") is None:
            raise TypeError(f"`emanet {name}` has no handler: its register() must call set_defaults(func=...)")
        _add_verbosity(p, default=argparse.SUPPRESS)
    return parser


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

    def show_warning(message, category, filename, lineno, file=None, line=None):  # no source line
        write(f"emanet {args.command}: warning: {message}", stream=sys.stderr)

    shown_before, warnings.showwarning = warnings.showwarning, show_warning
    try:
        yield
    finally:
        warnings.showwarning = shown_before
        logger.removeHandler(handler)
        logger.setLevel(level_before)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`emanet eval RUN --device cpu eval.flip=true`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    with _logging_to_stderr(args):
        try:
            return args.func(args)
        except UserError as e:  # a mistake the user can fix: the message says how, no traceback
            print(f"emanet {args.command}: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # a missing file, a read-only folder, a full disk: the path and the OS reason
            where = f"{e.filename}: " if e.filename else ""
            print(f"emanet {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
            return 2
        # anything else is a bug: it propagates with its traceback (exit status 1)


def run() -> None:
    """The `emanet` program: ``main``'s exit code; a torchrun worker leaves without interpreter teardown.

    DistributedDataParallel keeps its process group alive after ``destroy_process_group`` (torch 2.13: the
    gloo group's three threads are still running when the interpreter finalizes), and finalizing around
    them can abort a worker ("terminate called without an active exception", SIGABRT) after a run that
    finished well, which torchrun then reports as a failed job. Every file is closed by then; output and
    logging are flushed, then the worker ends with ``os._exit``. A plain process exits normally.
    """
    code = main()
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
