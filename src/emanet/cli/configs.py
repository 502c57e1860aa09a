"""`emanet configs`: list the packaged YAML recipes, or print one."""

from __future__ import annotations

import argparse

from emanet.config import packaged_configs, resolve_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="list the packaged YAML recipes (use them with --config NAME)")
    p.add_argument("--show", metavar="NAME", help="print one recipe (to copy and edit)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.show:
        print(resolve_config(args.show).read_text(), end="")
        return 0
    for name, path in packaged_configs().items():
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "#").lstrip("# ").strip()
        print(f"{name:<16} {first}")
    print("use one by name (emanet train --config voc_reference) or copy it: emanet configs --show NAME > my.yaml")
    return 0
