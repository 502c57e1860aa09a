"""`emanet export`: a model as ONNX (dynamic batch/H/W), float32 or int8 for CPUs, optionally checked against
PyTorch with onnxruntime before the file is written."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from emanet.cli.common import claim_output, run_config
from emanet.data.base import IMAGE_SUFFIXES, find_images
from emanet.deploy.export import (
    MIN_AGREEMENT,
    RELATIVE_TOLERANCE,
    check_parity,
    export_onnx,
    onnx_parity,
    require_onnx,
)
from emanet.deploy.hub import resolve_source
from emanet.deploy.quantize import (
    CALIBRATION_IMAGES,
    CHECK_IMAGES,
    QUANTIZATIONS,
    int8_parity,
    quantize_int8,
    read_images,
)
from emanet.deploy.quantize import MIN_AGREEMENT as INT8_MIN_AGREEMENT
from emanet.errors import ConfigError, DataError
from emanet.pretrained import LoadedModel, load_model
from emanet.train.data import build_datasets

VAL = "val"  # --calibration's name for the config's validation split

EXAMPLE = """examples:
  emanet export model/ --out model.onnx --check          export, then compare with PyTorch (onnxruntime)
  emanet export runs/voc --out voc.onnx --size 513 513 --exporter dynamo
  emanet export model/ --out int8.onnx --quantize int8 --calibration val --check   int8, checked on held-out images"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch/H/W; float32 or int8), optionally checked against "
        "PyTorch with onnxruntime (docs/export.md)",
    )
    p.add_argument("source", help="a model folder (save_pretrained), a checkpoint file or a run folder")
    p.add_argument("overrides", nargs="*", help="section.key=value on the saved config, e.g. model.eval_stages=5")
    p.add_argument("--config", help="a YAML file or recipe instead of the source's own config (as `emanet eval`)")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="(default: onnx)")
    p.add_argument("--out", default="model.onnx", help="the ONNX file to write (default: model.onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--opset", type=int, help="ONNX opset (default: 17 torchscript, 18 dynamo)")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="example input size; the graph stays dynamic (default: the config's crop size)",
    )
    p.add_argument(
        "--exporter",
        choices=("torchscript", "dynamo"),
        default="torchscript",
        help="torch.onnx exporter: tracing (fast) or torch.export based (default: torchscript)",
    )
    p.add_argument(
        "--fold-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold BatchNorm into the preceding convs, as the prepared model does (default: on)",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="static int8 quantization for CPUs (onnxruntime QDQ; EM attention stays float32); needs --calibration",
    )
    p.add_argument(
        "--calibration",
        metavar="DATA",
        help=f"images to calibrate on: '{VAL}' (the validation split of the config's dataset, read as `emanet "
        "eval` reads it) or a folder of images (read as `emanet predict` reads them)",
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=CALIBRATION_IMAGES,
        metavar="N",
        help=f"calibrate on N images (default: {CALIBRATION_IMAGES})",
    )
    p.add_argument(
        "--check-images",
        type=int,
        default=CHECK_IMAGES,
        metavar="M",
        help=f"--check of an int8 export: M further images, not used for calibration (default: {CHECK_IMAGES})",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="compare onnxruntime with float32 PyTorch before writing (float: random inputs; int8: held-out "
        "images); a failed check writes nothing and exits 2",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        metavar="PCT",
        help=f"--check: least share of pixels with the same argmax, in percent (default: "
        f"{100 * MIN_AGREEMENT:g} float32, {100 * INT8_MIN_AGREEMENT:g} int8)",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=RELATIVE_TOLERANCE,
        help=f"--check of a float32 export: largest logit difference as a fraction of the largest |logit| "
        f"(default: {RELATIVE_TOLERANCE:g})",
    )
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """The flags' values and the onnx packages they need, before a large model is loaded."""
    if not args.rtol > 0:
        raise ConfigError(f"--rtol must be > 0, got {args.rtol}")
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 100:
        raise ConfigError(f"--min-agreement is a percentage from 0 to 100, got {args.min_agreement}")
    if args.size is not None and min(args.size) < 32:
        raise ConfigError(
            f"--size H W must be at least 32 pixels each (the backbone downsamples by up to 32), "
            f"got {args.size[0]} {args.size[1]}"
        )
    if args.quantize:
        if args.calibration is None:
            raise ConfigError(
                f"--quantize {args.quantize} needs --calibration DATA: '{VAL}' or a folder of images "
                "like those the model will see"
            )
        if args.exporter != "torchscript":
            raise ConfigError("--quantize needs --exporter torchscript (its node names locate the EM unit)")
        if not args.fold_bn:
            raise ConfigError("--no-fold-bn is for float32 graphs; int8 convolutions have BatchNorm folded in")
        if args.calibration_images < 1 or args.check_images < 1:
            raise ConfigError("--calibration-images and --check-images must be at least 1")
        if args.calibration != VAL and not Path(args.calibration).is_dir():
            raise ConfigError(f"--calibration {args.calibration}: not a folder of images, nor '{VAL}'")
    elif args.calibration is not None:
        raise ConfigError("--calibration is for --quantize int8")
    needed = ["onnx"]
    needed += ["onnxruntime"] if args.check or args.quantize else []
    needed += ["onnxscript"] if args.exporter == "dynamo" else []
    require_onnx(*needed)  # before loading a large model; OnnxNotInstalled is a user error


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    # before a large model is loaded: never a run's or model folder's own file, an existing file only with
    # --overwrite, the folder created and writable
    out = claim_output(args.out, overwrite=args.overwrite)
    # the source's own config (a --config file replaces it); overrides go on top of either, as in `emanet eval`
    file_cfg = run_config(args) if args.config else None
    overrides = [] if file_cfg else list(args.overrides)
    loaded = load_model(resolve_source(args.source), device="cpu", overrides=overrides, config=file_cfg)
    h, w = args.size if args.size is not None else (loaded.config.data.crop_size,) * 2
    if args.quantize:
        return _run_int8(args, loaded, out, h, w)
    # batch 1 at the export size, batch 2 at another size: both dynamic axes are exercised
    sizes = ((1, 3, h, w), (2, 3, max(32, h // 2 + 1), max(32, w // 2 + 3)))
    checked = []

    def verify(tmp: Path) -> None:  # reads the temporary: a file that fails its check never replaces --out
        parity = onnx_parity(loaded, tmp, sizes)
        checked.append(parity)
        print(f"check (float32 onnxruntime vs PyTorch, random inputs {sizes[0]} and {sizes[1]}): {parity.describe()}")
        check_parity(parity, out, min_agreement=_min_agreement(args, MIN_AGREEMENT), rtol=args.rtol)

    path = export_onnx(
        loaded,
        out,
        opset=args.opset,
        height=h,
        width=w,
        fold_bn=args.fold_bn,
        exporter=args.exporter,
        verify=verify if args.check else None,
    )
    print(
        f"written: {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.exporter} exporter, "
        f"input 'image' (B, 3, H, W) normalised float32, output 'logits')"
        + (
            f"; check passed (>= {_min_agreement(args, MIN_AGREEMENT) * 100:g}% agreement, <= {args.rtol:g} relative)"
            if checked
            else ""
        )
    )
    return 0


def _min_agreement(args: argparse.Namespace, default: float) -> float:
    return default if args.min_agreement is None else args.min_agreement / 100


def _run_int8(args: argparse.Namespace, loaded: LoadedModel, out: Path, h: int, w: int) -> int:
    n, m = args.calibration_images, args.check_images if args.check else 0
    calibration, held_out = _calibration_data(args.calibration, loaded, n, m)
    threshold = _min_agreement(args, INT8_MIN_AGREEMENT)

    def verify(tmp: Path) -> None:
        parity = int8_parity(loaded, tmp, held_out)
        print(f"check (int8 onnxruntime vs float32 PyTorch, {len(held_out)} held-out images): {parity.describe()}")
        check_parity(parity, out, min_agreement=threshold, rtol=None)

    path = quantize_int8(
        loaded, out, calibration, height=h, width=w, verify=verify if args.check else None, opset=args.opset
    )
    print(
        f"written: {path} ({path.stat().st_size / 2**20:.1f} MiB, int8 QDQ calibrated on {len(calibration)} "
        f"images, EM attention in float32, input 'image' (B, 3, H, W) normalised float32, output 'logits')"
        + (f"; check passed (>= {100 * threshold:g}% agreement)" if args.check else "")
    )
    return 0


def _calibration_data(data: str, loaded: LoadedModel, n: int, m: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``n`` calibration and ``m`` further (held-out) images, normalised (3, H, W), drawn in a fixed shuffled
    order from the config's validation split or the image folder ``data``."""
    if data == VAL:
        _, val = build_datasets(loaded.config)
        count, where = len(val), f"the {loaded.config.data.dataset} validation split"
    else:
        files = find_images(Path(data))
        count, where = len(files), f"the folder ({', '.join(IMAGE_SUFFIXES)})"
    if count < n + m:
        need = f"{n} calibration" + (f" + {m} held-out check" if m else "")
        lower = "--calibration-images" + (" / --check-images" if m else "")
        raise DataError(data, f"{where} has {count} images; {need} images are asked for: lower {lower}", kind="layout")
    order = [int(i) for i in np.random.default_rng(0).permutation(count)[: n + m]]
    # a dataset item is (image, mask) through the eval transform
    images = [val[i][0] for i in order] if data == VAL else read_images([files[i] for i in order], loaded.config)
    return images[:n], images[n:]
