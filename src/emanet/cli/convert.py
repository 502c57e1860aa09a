"""`emanet convert`: import a checkpoint of the EMANet reference, mmsegmentation or an ImageNet backbone."""

from __future__ import annotations

import argparse
from pathlib import Path

from emanet.checkpoint import claim_folder
from emanet.cli.common import claim_output
from emanet.convert.checkpoints import convert
from emanet.convert.keys import FULL_MODEL_SOURCES

EXAMPLE = """examples:
  emanet convert --from reference emanet_voc.pth model/              a full model, as a model folder
  emanet convert --from mmseg ema_r101.pth model/ model.output_stride=8
  emanet convert --from torchvision resnet101.pth r101.safetensors   ImageNet weights of a backbone"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="import a checkpoint from the EMANet reference, mmsegmentation or an "
        "ImageNet backbone file (docs/convert.md)",
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=("reference", "mmseg", "torchvision", "reference-backbone", "mmseg-backbone"),
        help="source format: full models (reference, mmseg) or ImageNet backbones",
    )
    p.add_argument("src", help="the checkpoint to convert (.pth/.pt/.safetensors)")
    p.add_argument("dst", help="a model folder (full models) or a .safetensors file (backbones)")
    p.add_argument("overrides", nargs="*", help="section.key=value on the inferred config, e.g. model.output_stride=16")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="a state dict that itself holds pickled objects other than tensors: load it with weights_only=False "
        "(runs pickled code: only for files you trust); other pickled objects (an mmengine message hub) are read "
        "without it, as inert stubs",
    )
    p.add_argument(
        "--assume-defaults",
        action="store_true",
        help="an mmseg checkpoint without config text whose name implies another test pipeline (769x769): "
        "convert with our mmseg defaults anyway (the warning says which were assumed)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.set_defaults(func=run)


def _claim_destination(args: argparse.Namespace) -> None:
    """Before the source is read: a backbone file is never a run's or model folder's own file and replaces an
    existing file only with --overwrite; the folder that will hold the destination is created and writable.
    (``convert`` itself refuses a non-empty model folder without --overwrite.)"""
    dst = Path(args.dst)
    if args.source in FULL_MODEL_SOURCES:
        claim_folder(dst.parent)  # not dst itself: a failed conversion leaves no empty folder behind
    elif dst.suffix == ".safetensors":  # convert explains any other name
        claim_output(dst, overwrite=args.overwrite, flag="destination")


def run(args: argparse.Namespace) -> int:
    _claim_destination(args)
    result = convert(
        args.src,
        args.dst,
        args.source,
        overrides=args.overrides,
        allow_pickle=args.allow_pickle,
        assume_defaults=args.assume_defaults,
        overwrite=args.overwrite,
    )
    print(result.summary())
    kind = "model folder" if result.model_config is not None else "backbone weights"
    print(f"written: {args.dst} ({kind})")
    return 0
