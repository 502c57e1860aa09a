"""`emanet eval`: evaluate a model folder, checkpoint or run: mIoU, aAcc, mAcc, fwIoU and a per-class table."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from emanet.checkpoint import write_text_atomic
from emanet.cli.common import (
    add_compile,
    add_no_prepare,
    add_no_progress,
    add_precision,
    claim_output,
    run_config,
    run_overrides,
)
from emanet.deploy.hub import resolve_source
from emanet.deploy.model_card import refresh_model_card
from emanet.deploy.onnx_model import is_onnx_file, load_onnx
from emanet.errors import install_hint
from emanet.evaluation import evaluate, results_to_json
from emanet.experiments.plots import plot_class_iou, plot_confusion, require_matplotlib
from emanet.metrics import format_table
from emanet.models.fuse import prepare_for_inference
from emanet.pretrained import EVAL, load_model
from emanet.runtime import check_precision, maybe_compile, select_device
from emanet.train.data import build_datasets

EXAMPLE = """examples:
  emanet eval runs/toy                                     the run's newest checkpoint
  emanet eval runs/voc data.root=/data/voc eval.scales=[0.5,0.75,1,1.25,1.5,1.75] eval.flip=true
  emanet eval model/ --max-images 100 --out eval.json --plot"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: mIoU, aAcc, mAcc, fwIoU and a per-class table")
    p.add_argument(
        "checkpoint",
        help="a model folder, a checkpoint file, a run folder (its newest checkpoint) or an exported .onnx file",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="e.g. eval.scales=[0.5,0.75,1,1.25,1.5,1.75] eval.flip=true eval.eval_stages=5 data.root=/data/voc",
    )
    p.add_argument("--config", help="a YAML file instead of the checkpoint's own config")
    p.add_argument("--device", help="cpu, cuda (default: auto)")
    add_precision(p, help="autocast precision (EM stays fp32)")
    add_compile(p)
    add_no_prepare(p)
    p.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images")
    p.add_argument(
        "--out",
        help="JSON file for the results (default: eval.json in a model folder, else eval_<checkpoint>.json beside "
        "the checkpoint, rewritten by each eval)",
    )
    plot_help = (
        f"also OUT_confusion.png (row-normalised) and OUT_iou.png (per-class IoU) beside it; {install_hint('report')}"
    )
    p.add_argument("--plot", action="store_true", help=plot_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (and its plots)")
    add_no_progress(p, help=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.precision:  # before loading anything
        check_precision(select_device(args.device or "auto"), args.precision)
    if args.plot:
        require_matplotlib()  # before a long evaluation
    # the source's own config (a --config file replaces it); overrides go on top of either
    file_cfg = run_config(args) if args.config else None
    overrides = [] if file_cfg else run_overrides(args)
    onnx = is_onnx_file(args.checkpoint)
    if onnx:  # its config is the file's metadata; onnxruntime runs it on the CPU in float32
        loaded = load_onnx(args.checkpoint, overrides=overrides, config=file_cfg)
    else:
        loaded = load_model(resolve_source(args.checkpoint), overrides=overrides, config=file_cfg)
    cfg = loaded.config
    device = select_device(cfg.train.device)
    outputs = _claim_outputs(args, loaded.source)  # before the evaluation, which may take hours
    model = loaded.model.to(device)
    if not (args.no_prepare or onnx):  # BatchNorm folded, channels_last: the same results within float32 rounding
        model = prepare_for_inference(model)
    model = maybe_compile(model, cfg.train.compile)
    _, val = build_datasets(cfg)
    results = evaluate(model, val, cfg, device, max_images=args.max_images, progress=not args.no_progress)
    results = results_to_json(results)
    names = list(getattr(val, "classes", [])) or loaded.class_names
    print(format_table(results, names))
    if results.get("skipped_files"):
        skipped = results["skipped_files"]
        print(f"{len(skipped)} bad file(s) left out (data.on_bad_sample=skip):\n  " + "\n  ".join(skipped))
    out = outputs[0]
    write_text_atomic(
        out, json.dumps({"source": str(loaded.source), "eval": dataclasses.asdict(cfg.eval), **results}, indent=2)
    )
    print(f"written: {out}")
    if args.plot:
        confusion, bars = outputs[1:]
        plot_confusion(results["confusion_matrix"], names, confusion)  # written whole or not at all
        plot_class_iou(results["IoU"], names, bars)
        print(f"written: {confusion}, {bars}")
    if loaded.source.is_dir() and _is_default(out, loaded.source):  # a model folder's card shows its eval.json
        card = refresh_model_card(loaded.source)
        if card is not None:
            print(f"written: {card}")
    return 0


def default_out(source: Path) -> Path:
    """eval.json in a model folder, else eval_<stem>.json beside the checkpoint file."""
    return source / EVAL if source.is_dir() else source.parent / f"eval_{source.stem}.json"


def _is_default(out: Path, source: Path) -> bool:
    return out.resolve() == default_out(source).resolve()


def _claim_outputs(args: argparse.Namespace, source: Path) -> list[Path]:
    """The JSON file (and with --plot its two figures), checked before the evaluation: never a file of a run
    or model folder, the folder created and writable. The default file beside the checkpoint is each eval's
    own and is rewritten freely; an explicit --out that exists needs --overwrite."""
    out = Path(args.out) if args.out else default_out(source)
    overwrite = args.overwrite or _is_default(out, source)
    paths = [out] + ([out.with_name(f"{out.stem}_{kind}.png") for kind in ("confusion", "iou")] if args.plot else [])
    return [claim_output(path, overwrite=overwrite) for path in paths]
