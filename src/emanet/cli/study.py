"""`emanet study`: the paper's studies (iterations grid, bases maintenance) and the head layouts, each in one
resumable folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emanet.cli.common import add_no_progress
from emanet.errors import ConfigError
from emanet.experiments.study import EVAL_STAGES, STUDIES, TRAIN_STAGES, VARIANT_STUDIES, run_study


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {value!r}") from None


EXAMPLE = """examples:
  emanet study iterations --config synthetic_toy --out studies/t           T_train x T_eval grid
  emanet study bases --config synthetic_toy --out studies/b --variants ema,none,learned
  emanet study iterations --config voc_reference data.root=/data/voc --out studies/voc --run T3=runs/voc"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="the paper's studies: T_train x T_eval grid (iterations), bases maintenance and gradients "
        "(bases), or head layout x auxiliary head with per-class IoU (heads); resumable",
    )
    p.add_argument("study", choices=STUDIES, help="which study")
    p.add_argument("--config", help="YAML file or packaged recipe name (e.g. synthetic_toy, voc_reference)")
    p.add_argument("overrides", nargs="*", help="section.key=value for every variant, e.g. data.root=/data/voc")
    p.add_argument("--out", required=True, help="the study folder (run the same command again to continue)")
    p.add_argument("--train-stages", type=_int_list, metavar="T,T", help="iterations: T_train (default: 1,2,3,4,5)")
    p.add_argument("--eval-stages", type=_int_list, metavar="T,T", help="iterations: T_eval (default: 1,...,8)")
    p.add_argument(
        "--variants",
        type=lambda v: v.split(","),
        metavar="NAME,NAME",
        help="bases or heads: a subset of their variants (default: all); "
        + "; ".join(f"{kind}: {','.join(names)}" for kind, names in VARIANT_STUDIES.items()),
    )
    p.add_argument(
        "--run",
        action="append",
        metavar="NAME=PATH",
        help="use an existing run for a variant instead of training it (e.g. T3=runs/voc); repeatable",
    )
    p.add_argument("--max-images", type=int, default=0, help="evaluate on the first N validation images (0 = all)")
    add_no_progress(p, help=None)
    p.set_defaults(func=run)


def _existing_runs(items: list[str] | None) -> dict[str, str]:
    """--run NAME=PATH, repeated -> {NAME: PATH}."""
    existing = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--run takes NAME=PATH (e.g. T3=runs/voc), got {item!r}")
        existing[name] = path
    return existing


def run(args: argparse.Namespace) -> int:
    existing = _existing_runs(args.run)
    if args.max_images < 0:
        raise ConfigError(f"--max-images must be >= 0 (0 = the whole split), got {args.max_images}")
    # the command as typed, for the study's commands.sh (not when called from Python with other argv)
    argv = sys.argv[1:] if Path(sys.argv[0]).name in ("emanet", "__main__.py") else None
    results = run_study(
        args.study,
        args.out,
        config=args.config,
        overrides=args.overrides,
        train_stages=args.train_stages or TRAIN_STAGES,
        eval_stages=args.eval_stages or EVAL_STAGES,
        variants=args.variants,
        existing_runs=existing,
        max_images=args.max_images,
        progress=not args.no_progress,
        argv=argv,
    )
    print(results["table"])
    print(f"study folder: {args.out} (table.md, results.json, commands.sh)")
    return 0
