"""`emanet check-data`: scan the configured dataset for unreadable, truncated or bad files."""

from __future__ import annotations

import argparse
import json

from emanet.checkpoint import write_text_atomic
from emanet.cli.common import add_no_progress, claim_output, run_config
from emanet.data.check import check_data_config
from emanet.errors import ConfigError

EXAMPLE = """examples:
  emanet check-data --config voc_reference data.root=/data/voc
  emanet check-data --config cityscapes data.root=/data/cityscapes --split val --json report.json"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-data", help="scan the configured dataset for unreadable, truncated or bad files")
    p.add_argument("--config", help="YAML file or packaged recipe name; its data section names the dataset")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.root=/data/voc")
    p.add_argument(
        "--split",
        choices=("train", "val", "both"),
        default="both",
        help="data.train_split, data.val_split or both (default: both)",
    )
    p.add_argument("--json", metavar="OUT", help="write the full report (every problem, with details) to OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--max-files", type=int, metavar="N", help="scan only the first N samples of each split")
    p.add_argument("--show", type=int, default=50, metavar="N", help="problems printed per split (default: 50)")
    add_no_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_files is not None and args.max_files < 1:
        raise ConfigError(f"--max-files must be >= 1, got {args.max_files}")
    cfg = run_config(args)
    # checked before the scan: never a run's or model's own file, an existing one only with --overwrite
    out = claim_output(args.json, overwrite=args.overwrite, flag="--json") if args.json else None
    splits = ("train", "val") if args.split == "both" else (args.split,)
    reports = check_data_config(
        cfg.data,
        splits=splits,
        num_classes=cfg.model.num_classes,
        max_files=args.max_files,
        progress=not args.no_progress,
    )
    for report in reports:
        print(report.format(limit=args.show))
    found = sum(len(r.problems) for r in reports)
    if out is not None:
        report = {"config": args.config, "ok": found == 0, "reports": [r.to_dict() for r in reports]}
        write_text_atomic(out, json.dumps(report, indent=2))
        print(f"written: {out}")
    print(f"check-data: {found} problem(s) found" if found else "check-data: no problems found")
    return 1 if found else 0
