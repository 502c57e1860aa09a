"""The parser module: flags only, bound to the handlers that emanet.cli.main hands it."""

from __future__ import annotations

import argparse

import pytest

from emanet.cli import args as cli_args
from emanet.cli import main as cli


def test_every_subcommand_is_bound_to_its_handler():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli.HANDLERS)
    for name, p in sub.choices.items():
        assert p.get_default("func") is cli.HANDLERS[name]


def test_a_subcommand_without_a_handler_is_refused_when_the_parser_is_built():
    handlers = {k: v for k, v in cli.HANDLERS.items() if k != "study"}
    with pytest.raises(TypeError, match="study"):
        cli_args.build_parser(handlers)
    with pytest.raises(TypeError, match="extra"):
        cli_args.build_parser({**cli.HANDLERS, "extra": cli.cmd_demo})
