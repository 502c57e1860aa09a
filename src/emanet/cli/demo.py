"""`emanet demo`: EMANet vs FCN on the synthetic context set (CPU), with a report."""

from __future__ import annotations

import argparse

from emanet.cli.common import add_no_progress
from emanet.experiments.demo import run_demo

EXAMPLE = """examples:
  emanet demo                                  EMANet vs FCN, report in reports/demo
  emanet demo --out reports/short train.iterations=100"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train EMANet and FCN on the synthetic context set (CPU) and write a report")
    p.add_argument("--out", default="reports/demo", help="report folder (default: reports/demo)")
    p.add_argument("--config", help="a YAML file instead of the built-in demo settings")
    p.add_argument("overrides", nargs="*", help="section.key=value on top, e.g. train.iterations=100")
    add_no_progress(p, help=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # --out is made and proven writable once the config is valid, before minutes of training
    result = run_demo(args.out, args.overrides, args.config, progress=not args.no_progress)
    print(result["summary"])
    print(f"report: {result['report'].resolve()} (and report.html)")
    return 0
