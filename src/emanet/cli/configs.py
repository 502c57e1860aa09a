"""`emanet configs`: list the packaged YAML recipes, print one, or list every config key."""

from __future__ import annotations

import argparse
import re
import textwrap
from pathlib import Path

from emanet.config import config_keys, packaged_configs, resolve_config

EXAMPLE = """examples:
  emanet configs                                  the recipes, each with what it is
  emanet configs --show synthetic_toy > my.yaml   a recipe to copy and edit
  emanet configs --keys                           every key: default, type or allowed values, what it is"""

WIDTH = 100  # the listing's line width


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "configs", help="list the packaged YAML recipes (use them with --config NAME), print one, or list every key"
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--show", metavar="NAME", help="print one recipe (to copy and edit)")
    what.add_argument(
        "--keys", action="store_true", help="list every config key with its default, its type or allowed values"
    )
    p.set_defaults(func=run)


def summary(path: Path) -> str:
    """A recipe's first sentence, whole: its leading comment lines joined up to the first full stop."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", text)  # not the stop of an "e.g."
    return text[: end.start() + 1] if end else text


def run(args: argparse.Namespace) -> int:
    if args.show:
        print(resolve_config(args.show).read_text(), end="")
        return 0
    if args.keys:
        print_keys()
        return 0
    recipes = packaged_configs()
    indent = max(len(name) for name in recipes) + 2
    for name, path in recipes.items():
        wrapped = textwrap.wrap(summary(path), WIDTH - indent)
        print(f"{name:<{indent}}" + f"\n{' ' * indent}".join(wrapped))
    print("use one by name (emanet train --config voc_reference) or copy it: emanet configs --show NAME > my.yaml")
    return 0


def print_keys() -> None:
    """One line per key: the key, its default, its allowed values (or type), then what it is on the next line."""
    keys = config_keys()
    width = max(len(k.key) for k in keys) + 2
    print(f"{'key':<{width}}default = ..., allowed values or type; what it is")
    for k in keys:
        kind = " | ".join(k.allowed) if k.allowed and not k.type.startswith("list[") else k.type  # list[a | b]
        print(f"{k.key:<{width}}{k.default}  ({kind})")
        if k.reason:
            print(textwrap.fill(k.reason, WIDTH, initial_indent=" " * (width + 2), subsequent_indent=" " * (width + 2)))
    print("set any with section.key=value after the command, or in a YAML file given with --config")
