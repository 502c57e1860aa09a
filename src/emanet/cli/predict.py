"""`emanet predict`: label maps, colour images and overlays (+ EM attention maps) for image files."""

from __future__ import annotations

import argparse
import logging
import typing

from emanet.checkpoint import claim_folder
from emanet.cli.common import add_compile, add_no_prepare, add_no_progress, add_precision
from emanet.deploy.predict import Predictor
from emanet.deploy.predict_files import PredictOptions, collect_inputs, plan_outputs, predict_files
from emanet.errors import ConfigError
from emanet.inference import Mode

logger = logging.getLogger(__name__)


EXAMPLE = """examples:
  emanet predict runs/toy photo.jpg --out preds/           label map, colours and overlay
  emanet predict model/ images/ --out preds/ --attention   a folder, with EM attention maps
  emanet predict model/ "shots/*.png" --out preds/ --mode slide --crop-size 513 --stride 341"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="label maps, colour images and overlays (+ EM attention maps) for images")
    p.add_argument(
        "source", help="a model folder (save_pretrained), a checkpoint file, a run folder or an exported .onnx file"
    )
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or quoted globs")
    p.add_argument("--out", required=True, help="output folder; names mirror the inputs (NAME.png, NAME_color.png...)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward; same-size images batch (default: 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    add_precision(p, default="fp32", help="autocast (EM stays fp32)")
    p.add_argument(
        "--mode", choices=typing.get_args(Mode), help="whole image or sliding window (default: the config's)"
    )
    p.add_argument("--crop-size", type=int, nargs="+", metavar="N", help="sliding window size: N or H W")
    p.add_argument("--stride", type=int, nargs="+", metavar="N", help="sliding window stride: N or H W")
    p.add_argument("--scales", type=float, nargs="+", help="multi-scale factors, e.g. 0.75 1 1.25 (default: config's)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, help="also predict the mirrored image (averaged)")
    p.add_argument("--eval-stages", type=int, help="EM iterations T at test time (default: the model's)")
    add_compile(p)
    add_no_prepare(p)
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the colours in NAME_overlay.png (default: 0.5)")
    p.add_argument("--attention", action="store_true", help="write NAME_attention.png: the heaviest EM bases' maps")
    p.add_argument("--attention-bases", type=int, default=6, help="bases shown with --attention (default: 6)")
    p.add_argument("--save-arrays", action="store_true", help="also NAME_attention.npz, raw responsibilities (K, h, w)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist already in --out")
    add_no_progress(p)
    p.set_defaults(func=run)


def _pair(flag: str, value: list[int] | None) -> tuple[int, int] | None:
    """N -> (N, N); H W -> (H, W)."""
    if value is None:
        return None
    if len(value) not in (1, 2):
        raise ConfigError(f"{flag} takes one size or H W, got {' '.join(map(str, value))}")
    return value[0], value[-1]


def run(args: argparse.Namespace) -> int:
    crop_size, stride = _pair("--crop-size", args.crop_size), _pair("--stride", args.stride)
    options = PredictOptions(
        alpha=args.alpha,
        attention=args.attention or args.save_arrays,
        attention_bases=args.attention_bases,
        save_arrays=args.save_arrays,
    )
    predictor = Predictor.from_source(
        args.source,
        device=args.device,
        precision=args.precision,
        mode=args.mode,
        scales=args.scales,
        flip=args.flip,
        crop_size=crop_size,
        stride=stride,
        eval_stages=args.eval_stages,
        batch_size=args.batch_size,
        prepare=not args.no_prepare,
        compile=args.compile,
    )
    if options.attention:
        predictor.require_attention()  # before reading any image
    # before any image is read: the folder writable, the outputs free (or --overwrite), their names possible
    out = claim_folder(args.out)
    files, problems = collect_inputs(args.inputs, exclude=out)
    if not files and not problems:
        raise ConfigError("no input images given")
    files, unwritable = plan_outputs(files, out, options, overwrite=args.overwrite)
    problems += [f"{path}: {reason}" for path, reason in unwritable]
    for problem in problems:
        logger.warning(problem)
    failures = predict_files(predictor, files, out, options=options, progress=not args.no_progress)
    failed = len(failures) + len(problems)
    total = len(files) + len(unwritable)
    print(
        f"{len(files) - len(failures)} of {total} images predicted into {args.out}"
        + (f"; {failed} input(s) failed (listed above)" if failed else "")
    )
    return 1 if failed else 0
