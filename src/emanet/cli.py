"""Command line: `emanet <command> ...`. The only module that reads argv or prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from emanet.models.emanet import ARCHS, ModelConfig


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=ARCHS, default="emanet", help="context module (default: emanet)")
    g.add_argument("--backbone", default="resnet101", help="resnet18/34/50/101/152 (default: resnet101)")
    g.add_argument("--stem", default="deep", choices=("standard", "deep", "v1c"), help="ResNet stem (default: deep)")
    g.add_argument("--output-stride", type=int, default=8, choices=(8, 16, 32), help="(default: 8)")
    g.add_argument("--channels", type=int, default=512, help="reduction/EMA width: 512 or 256 in the paper")
    g.add_argument("--num-bases", type=int, default=64, help="K (default: 64)")
    g.add_argument("--num-stages", type=int, default=3, help="T (default: 3)")
    g.add_argument("--num-classes", type=int, default=21, help="(default: 21)")
    g.add_argument("--head-layout", default="reference", choices=("reference", "mmseg"), help="(default: reference)")
    g.add_argument("--aux", action="store_true", help="add the auxiliary FCN head on layer3")


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        arch=args.arch,
        backbone=args.backbone,
        stem=args.stem,
        output_stride=args.output_stride,
        channels=args.channels,
        num_bases=args.num_bases,
        num_stages=args.num_stages,
        num_classes=args.num_classes,
        head_layout=args.head_layout,
        aux=args.aux,
    )


def cmd_flops(args: argparse.Namespace) -> int:
    from emanet.flops import count_config, format_model_cost, format_table1, table1

    size = tuple(args.size)
    cfg = _model_config(args)
    cost = count_config(cfg, size)
    rows = [] if args.no_paper else table1(size)
    if args.json:
        print(json.dumps({"config": dataclasses.asdict(cfg), "cost": cost.to_dict(), "table1": rows}, indent=2))
        return 0
    print(f"{cfg.arch} {cfg.backbone} stem={cfg.stem} OS{cfg.output_stride} channels={cfg.channels} "
          f"K={cfg.num_bases} T={cfg.num_stages}")  # fmt: skip
    print(format_model_cost(cost))
    if rows:
        print(f"\nPaper Table 1 (ResNet-101 deep stem, OS8, {size[0]}x{size[1]}; multiply-adds):")
        print(format_table1(rows))
        nl, ema = rows[3]["gmacs"] - rows[4]["gmacs"], rows[1]["gmacs"] - rows[4]["gmacs"]
        print(f"\ncontext module alone: EMA unit {ema:.2f} GMACs (O(NK)) vs non-local {nl:.2f} GMACs (O(N^2)): "
              f"{nl / ema:.1f}x")  # fmt: skip
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from emanet.benchmark import run_benchmarks

    run_benchmarks(out_dir=args.out, quick=args.quick, parts=args.parts, log=print)
    return 0


def _run_config(args: argparse.Namespace, base: dict | None = None):
    from emanet.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"train.device={args.device}")
    if getattr(args, "precision", None):
        overrides.append(f"train.precision={args.precision}")
    return load_config(args.config, overrides, base=base)


def cmd_train(args: argparse.Namespace) -> int:
    from emanet.engine import train
    from emanet.metrics import format_table

    cfg = _run_config(args)
    out = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(format_table(out["results"], out["class_names"]))
    print(f"run folder: {out['run']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from emanet.checkpoint import latest_checkpoint, load_checkpoint
    from emanet.engine import _jsonable, build_datasets, evaluate, select_device
    from emanet.metrics import format_table
    from emanet.models.emanet import build_model

    path = Path(args.checkpoint)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint (iter_*.pt) in {path}")
        path = found
    ckpt = load_checkpoint(path)
    # a --config file replaces the run's own resolved config; overrides go on top of either
    cfg = _run_config(args, base=None if args.config else ckpt["config"])
    device = select_device(cfg.train.device)
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    model.to(device)
    _, val = build_datasets(cfg)
    results = evaluate(model, val, cfg, device, max_images=args.max_images, progress=not args.no_progress)
    results = _jsonable(results)
    print(format_table(results, list(getattr(val, "classes", []))))
    out = Path(args.out) if args.out else path.parent / f"eval_{path.stem}.json"
    out.write_text(json.dumps({"checkpoint": str(path), "eval": dataclasses.asdict(cfg.eval), **results}, indent=2))
    print(f"written: {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from emanet.demo import run_demo

    run_demo(args.out, args.overrides, args.config, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emanet", description="EMANet semantic segmentation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="parameters and multiply-adds, beside the paper's Table 1")
    _model_args(p)
    p.add_argument("--size", type=int, nargs=2, default=(513, 513), metavar=("H", "W"), help="(default: 513 513)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--no-paper", action="store_true", help="skip the Table 1 comparison")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("train", help="train a model from a YAML config (+ section.key=value overrides)")
    p.add_argument("--config", help="YAML file (configs/*.yaml); defaults = the reference VOC recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.iterations=1000 model.num_bases=32")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (EM stays fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint: mIoU, aAcc, mAcc, fwIoU and a per-class table")
    p.add_argument("checkpoint", help="a checkpoint file or a run folder (its newest checkpoint)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="e.g. eval.scales=[0.5,0.75,1,1.25,1.5,1.75] eval.flip=true eval.eval_stages=5 data.root=/data/voc",
    )
    p.add_argument("--config", help="a YAML file instead of the checkpoint's own config")
    p.add_argument("--device", help="cpu, cuda (default: auto)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (EM stays fp32)")
    p.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images")
    p.add_argument("--out", help="JSON file for the results (default: next to the checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="train EMANet and FCN on the synthetic context set (CPU) and write a report")
    p.add_argument("--out", default="reports/demo", help="report folder (default: reports/demo)")
    p.add_argument("--config", help="a YAML file instead of the built-in demo settings")
    p.add_argument("overrides", nargs="*", help="section.key=value on top, e.g. train.iterations=100")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="speed benchmarks of the EM attention and the whole model")
    p.add_argument("--out", default="benchmarks", help="folder for results.md / results.json (default: benchmarks)")
    p.add_argument("--parts", nargs="+", default=("em", "model"), choices=("em", "model"), help="what to run")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`emanet eval RUN --device cpu eval.flip=true`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user mistakes: a message, not a traceback
        print(f"emanet {args.command}: error: {e}", file=sys.stderr)
        return 2
