"""`emanet export`: a model as ONNX (dynamic batch/H/W), optionally checked against PyTorch with onnxruntime."""

from __future__ import annotations

import argparse

from emanet.cli.common import claim_output
from emanet.deploy.export import export_onnx, model_metadata, onnx_parity, require_onnx
from emanet.deploy.hub import resolve_source
from emanet.errors import ConfigError
from emanet.pretrained import load_model

EXAMPLE = """examples:
  emanet export model/ --out model.onnx --check          export, then compare with PyTorch (onnxruntime)
  emanet export runs/voc --out voc.onnx --size 513 513 --exporter dynamo"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch/H/W), optionally checked against "
        "PyTorch with onnxruntime (docs/export.md)",
    )
    p.add_argument("source", help="a model folder (save_pretrained), a checkpoint file or a run folder")
    p.add_argument("overrides", nargs="*", help="section.key=value on the saved config, e.g. model.eval_stages=5")
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
        "--check",
        action="store_true",
        help="compare onnxruntime with PyTorch on random inputs; exit 1 if the max diff >= --tolerance",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,  # emanet.deploy.export.TOLERANCE
        help="largest accepted absolute logit difference for --check (default: 1e-4)",
    )
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """The flags' values and the onnx packages they need, before a large model is loaded."""
    if not args.tolerance > 0:
        raise ConfigError(f"--tolerance must be > 0, got {args.tolerance}")
    if args.size is not None and min(args.size) < 32:
        raise ConfigError(
            f"--size H W must be at least 32 pixels each (the backbone downsamples by up to 32), "
            f"got {args.size[0]} {args.size[1]}"
        )
    needed = ["onnx"] + (["onnxruntime"] if args.check else []) + (["onnxscript"] if args.exporter == "dynamo" else [])
    require_onnx(*needed)  # before loading a large model; OnnxNotInstalled is a user error


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    # before a large model is loaded: never a run's or model folder's own file, an existing file only with
    # --overwrite, the folder created and writable
    out = claim_output(args.out, overwrite=args.overwrite)
    loaded = load_model(resolve_source(args.source), device="cpu", overrides=args.overrides)
    h, w = args.size if args.size is not None else (loaded.config.data.crop_size,) * 2
    meta = model_metadata(loaded.config, loaded.class_names, loaded.palette)
    path = export_onnx(
        loaded.model,
        out,
        opset=args.opset,
        height=h,
        width=w,
        fold_bn=args.fold_bn,
        exporter=args.exporter,
        metadata=meta,
    )
    print(
        f"written: {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.exporter} exporter, "
        f"input 'image' (B, 3, H, W) normalised float32, output 'logits')"
    )
    if not args.check:
        return 0
    # batch 1 at the export size, batch 2 at another size: both dynamic axes are exercised
    sizes = ((1, 3, h, w), (2, 3, max(32, h // 2 + 1), max(32, w // 2 + 3)))
    parity = onnx_parity(loaded.model, path, sizes)
    ok = parity.max_abs_diff < args.tolerance
    print(
        f"check: max |onnxruntime - pytorch| logits = {parity.max_abs_diff:.3g} (largest |logit| "
        f"{parity.max_abs_logit:.3g}), same argmax on {100 * parity.label_agreement:.3f}% of pixels, inputs "
        f"{sizes[0]} and {sizes[1]}: {'ok' if ok else 'FAILED'} (tolerance {args.tolerance:g})"
    )
    if not ok:
        print("  float32 rounding alone can exceed 1e-4 on large EMANets (near one-hot E-step): see docs/export.md")
    return 0 if ok else 1
