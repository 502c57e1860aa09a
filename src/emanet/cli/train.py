"""`emanet train`: train a model from a YAML config and ``section.key=value`` overrides."""

from __future__ import annotations

import argparse
import sys

from emanet.cli.common import add_compile, add_no_progress, add_precision, run_config
from emanet.metrics import format_table
from emanet.train.loop import train
from emanet.train.setup import TrainingStopped

EXAMPLE = """examples:
  emanet train --config synthetic_toy train.out_dir=runs/toy   a toy run on generated data (CPU, minutes)
  emanet train --config voc_reference data.root=/data/voc model.pretrained_backbone=r101.safetensors
  emanet train --config voc_reference data.root=/data/voc --resume                continue after a stop
  torchrun --nproc_per_node=4 -m emanet train --config cityscapes data.root=/data/cityscapes"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config (+ section.key=value overrides)")
    p.add_argument("--config", help="YAML file or packaged recipe name (emanet configs); default: the VOC recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.iterations=1000 model.num_bases=32")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.add_argument(
        "--resume-from",
        metavar="PATH",
        help="continue from this checkpoint of train.out_dir (newer ones are moved aside), e.g. a good one after a "
        "non-finite loss",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a train.out_dir that holds a run: the old run is moved aside to <out_dir>.old-<time>",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    add_precision(p, help="autocast precision (EM stays fp32)")
    add_compile(p)
    add_no_progress(p)
    p.set_defaults(func=run)


def _say_why(e: TrainingStopped) -> None:
    """Rank 0 says why the run stopped, before any rank exits (torchrun would cut rank 0 short); the CLI's
    error boundary then returns the stop's exit status without saying it again."""
    if e.speaks:
        print(f"emanet train: {e}", file=sys.stderr, flush=True)
    e.reported = True


def run(args: argparse.Namespace) -> int:
    cfg = run_config(args)
    # an early stop (TrainingStopped: run folder/write 2, signal 3, non-finite loss 4, lost peer 5) goes on to
    # the CLI's error boundary, which returns its exit status
    out = train(
        cfg,
        resume=args.resume,
        resume_from=args.resume_from,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        on_stop=_say_why,
    )
    if out["rank"] == 0:
        print(format_table(out["results"], out["class_names"]))
        if out["skipped_steps"] or out["bad_samples"]:
            print(f"skipped steps (non-finite loss): {out['skipped_steps']}; bad training files: {out['bad_samples']}")
        print(f"run folder: {out['run']}")
    return 0
