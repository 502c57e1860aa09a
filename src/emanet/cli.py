"""Command line: `emanet <command> ...`. The only module that reads argv or prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
import warnings
from pathlib import Path

from emanet.fields import field_choices
from emanet.inference import Mode
from emanet.models.backbone import BACKBONES
from emanet.models.emanet import OUTPUT_STRIDES, ModelConfig
from emanet.runtime import Precision

# flops' model flags: (flag, ModelConfig field, help); defaults and allowed values come from ModelConfig
MODEL_FLAGS = (
    ("--arch", "arch", "context module"),
    ("--backbone", "backbone", "dilated ResNet"),
    ("--stem", "stem", "ResNet stem"),
    ("--output-stride", "output_stride", "output stride"),
    ("--channels", "channels", "reduction/EMA width: 512 or 256 in the paper"),
    ("--num-bases", "num_bases", "K"),
    ("--num-stages", "num_stages", "T"),
    ("--num-classes", "num_classes", "classes"),
    ("--head-layout", "head_layout", "head layout"),
)


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    defaults = ModelConfig()
    extra_choices = {"backbone": tuple(BACKBONES), "output_stride": OUTPUT_STRIDES}
    for flag, name, what in MODEL_FLAGS:
        default = getattr(defaults, name)
        allowed = field_choices(ModelConfig, name) or extra_choices.get(name)
        g.add_argument(flag, type=type(default), default=default, choices=allowed, help=f"{what} (default: {default})")
    g.add_argument("--aux", action="store_true", help="add the auxiliary FCN head on layer3")


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(**{name: getattr(args, name) for _, name, _ in MODEL_FLAGS}, aux=args.aux)


def cmd_flops(args: argparse.Namespace) -> int:
    from emanet.flops import count_config, format_model_cost, format_table1, table1

    size = tuple(args.size)
    cfg = _model_config(args)
    cost = count_config(cfg, size)
    rows = [] if args.no_paper else table1(size)
    if args.json:
        print(json.dumps({"config": dataclasses.asdict(cfg), "cost": cost.to_dict(), "table1": rows}, indent=2))
        return 0
    print(
        f"{cfg.arch} {cfg.backbone} stem={cfg.stem} OS{cfg.output_stride} channels={cfg.channels} "
        f"K={cfg.num_bases} T={cfg.num_stages}"
    )
    print(format_model_cost(cost))
    if rows:
        print(f"\nPaper Table 1 (ResNet-101 deep stem, OS8, {size[0]}x{size[1]}; multiply-adds):")
        print(format_table1(rows))
        nl, ema = rows[3]["gmacs"] - rows[4]["gmacs"], rows[1]["gmacs"] - rows[4]["gmacs"]
        print(
            f"\ncontext module alone: EMA unit {ema:.2f} GMACs (O(NK)) vs non-local {nl:.2f} GMACs (O(N^2)): "
            f"{nl / ema:.1f}x"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from emanet.benchmark import run_benchmarks

    run_benchmarks(out_dir=args.out, quick=args.quick, parts=args.parts, log=print)
    return 0


def _run_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"train.device={args.device}")
    if getattr(args, "precision", None):
        overrides.append(f"train.precision={args.precision}")
    if getattr(args, "compile", False):
        overrides.append("train.compile=true")
    return overrides


def _run_config(args: argparse.Namespace, base: dict | None = None):
    from emanet.config import load_config

    return load_config(args.config, _run_overrides(args), base=base)


def cmd_train(args: argparse.Namespace) -> int:
    from emanet.engine import TrainingStopped, train
    from emanet.metrics import format_table

    cfg = _run_config(args)
    try:
        out = train(
            cfg,
            resume=args.resume,
            resume_from=args.resume_from,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except TrainingStopped as e:  # run folder/write (2), signal (3) or non-finite loss (4): rank 0 says why
        if e.rank == 0:
            print(f"emanet train: {e}", file=sys.stderr)
        return e.exit_code
    if out["rank"] == 0:
        print(format_table(out["results"], out["class_names"]))
        if out["skipped_steps"] or out["bad_samples"]:
            print(f"skipped steps (non-finite loss): {out['skipped_steps']}; bad training files: {out['bad_samples']}")
        print(f"run folder: {out['run']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from emanet.compiled import maybe_compile
    from emanet.engine import build_datasets, evaluate, results_to_json
    from emanet.metrics import format_table
    from emanet.models.fuse import prepare_for_inference
    from emanet.pretrained import load_model
    from emanet.runtime import check_precision, select_device

    if args.precision:  # before loading anything
        check_precision(select_device(args.device or "auto"), args.precision)

    # the source's own config (a --config file replaces it); overrides go on top of either
    if args.plot:
        from emanet.plots import require_matplotlib

        require_matplotlib()  # before a long evaluation
    file_cfg = _run_config(args) if args.config else None
    overrides = [] if file_cfg else _run_overrides(args)
    loaded = load_model(args.checkpoint, overrides=overrides, config=file_cfg)
    cfg = loaded.config
    device = select_device(cfg.train.device)
    model = loaded.model.to(device)
    if not args.no_prepare:  # BatchNorm folded, channels_last: the same results within float32 rounding
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
    source = loaded.source
    default = source / "eval.json" if source.is_dir() else source.parent / f"eval_{source.stem}.json"
    out = Path(args.out) if args.out else default
    out.write_text(json.dumps({"source": str(source), "eval": dataclasses.asdict(cfg.eval), **results}, indent=2))
    print(f"written: {out}")
    if source.is_dir() and out == default:  # a model folder's card shows its eval.json
        from emanet.model_card import write_model_card

        card = write_model_card(source)
        if card is not None:
            print(f"written: {card}")
    if args.plot:
        from emanet.plots import plot_class_iou, plot_confusion

        confusion = plot_confusion(results["confusion_matrix"], names, out.with_name(f"{out.stem}_confusion.png"))
        bars = plot_class_iou(results["IoU"], names, out.with_name(f"{out.stem}_iou.png"))
        print(f"written: {confusion}, {bars}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from emanet.demo import run_demo

    run_demo(args.out, args.overrides, args.config, progress=not args.no_progress)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from emanet.predict import PredictOptions, Predictor, collect_inputs, predict_files
    from emanet.progress import write

    def report(message: str) -> None:  # keeps a terminal's progress bar intact
        write(message, stream=sys.stderr)

    for flag, value in (("--crop-size", args.crop_size), ("--stride", args.stride)):
        if value is not None and len(value) not in (1, 2):
            raise ValueError(f"{flag} takes one size or H W, got {' '.join(map(str, value))}")

    def pair(value: list[int] | None) -> tuple[int, int] | None:  # N -> (N, N); H W -> (H, W)
        return None if value is None else (value[0], value[-1])

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
        crop_size=pair(args.crop_size),
        stride=pair(args.stride),
        eval_stages=args.eval_stages,
        batch_size=args.batch_size,
        prepare=not args.no_prepare,
        compile=args.compile,
    )
    if options.attention:
        predictor.require_attention()  # before reading any image
    files, problems = collect_inputs(args.inputs, exclude=args.out)
    for problem in problems:
        report(problem)
    if not files and not problems:
        raise ValueError("no input images given")
    failures = predict_files(predictor, files, args.out, options=options, progress=not args.no_progress, log=report)
    failed = len(failures) + len(problems)
    print(
        f"{len(files) - len(failures)} of {len(files)} images predicted into {args.out}"
        + (f"; {failed} input(s) failed (listed above)" if failed else "")
    )
    return 1 if failed else 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from emanet.data.check import check_data_config

    if args.max_files is not None and args.max_files < 1:
        raise ValueError(f"--max-files must be >= 1, got {args.max_files}")
    cfg = _run_config(args)
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
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps({"config": args.config, "ok": found == 0, "reports": [r.to_dict() for r in reports]}, indent=2)
        )
        print(f"written: {out}")
    print(f"check-data: {found} problem(s) found" if found else "check-data: no problems found")
    return 1 if found else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from emanet.convert import convert

    result = convert(
        args.src,
        args.dst,
        args.source,
        overrides=args.overrides,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
    )
    print(result.summary())
    kind = "model folder" if result.model_config is not None else "backbone weights"
    print(f"written: {args.dst} ({kind})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from emanet.export import OnnxNotInstalled, export_onnx, model_metadata, onnx_parity, require_onnx
    from emanet.pretrained import load_model

    if not args.tolerance > 0:
        raise ValueError(f"--tolerance must be > 0, got {args.tolerance}")
    if args.size is not None and min(args.size) < 32:
        raise ValueError(
            f"--size H W must be at least 32 pixels each (the backbone downsamples by up to 32), "
            f"got {args.size[0]} {args.size[1]}"
        )
    needed = ["onnx"] + (["onnxruntime"] if args.check else []) + (["onnxscript"] if args.exporter == "dynamo" else [])
    try:
        require_onnx(*needed)  # before loading a large model
    except OnnxNotInstalled as e:
        raise ValueError(str(e)) from None
    loaded = load_model(args.source, device="cpu", overrides=args.overrides)
    h, w = args.size if args.size is not None else (loaded.config.data.crop_size,) * 2
    meta = model_metadata(loaded.config, loaded.class_names, loaded.palette)
    path = export_onnx(
        loaded.model,
        args.out,
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


COMPILE_HELP = "torch.compile the model (opt-in: tens of seconds of compiling before the first image or step)"
NO_PREPARE_HELP = "run the model as loaded: no BatchNorm folding, no channels_last (slower, same results)"


def cmd_configs(args: argparse.Namespace) -> int:
    from emanet.config import packaged_configs, resolve_config

    if args.show:
        print(resolve_config(args.show).read_text(), end="")
        return 0
    for name, path in packaged_configs().items():
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "#").lstrip("# ").strip()
        print(f"{name:<16} {first}")
    print("use one by name (emanet train --config voc_reference) or copy it: emanet configs --show NAME > my.yaml")
    return 0


def cmd_push_to_hub(args: argparse.Namespace) -> int:
    from emanet.hub import HubError, push_to_hub

    try:
        url = push_to_hub(args.source, args.repo_id, private=args.private, revision=args.revision)
    except (ImportError, HubError) as e:
        raise ValueError(str(e)) from None
    print(f"pushed: {url}")
    return 0


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {value!r}") from None


def cmd_study(args: argparse.Namespace) -> int:
    from emanet.study import EVAL_STAGES, TRAIN_STAGES, run_study

    existing = {}
    for item in args.run or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--run takes NAME=PATH (e.g. T3=runs/voc), got {item!r}")
        existing[name] = path
    if args.max_images < 0:
        raise ValueError(f"--max-images must be >= 0 (0 = the whole split), got {args.max_images}")
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


def _add_configs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="list the packaged YAML recipes (use them with --config NAME)")
    p.add_argument("--show", metavar="NAME", help="print one recipe (to copy and edit)")
    p.set_defaults(func=cmd_configs)


def _add_flops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="parameters and multiply-adds, beside the paper's Table 1")
    _model_args(p)
    p.add_argument("--size", type=int, nargs=2, default=(513, 513), metavar=("H", "W"), help="(default: 513 513)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--no-paper", action="store_true", help="skip the Table 1 comparison")
    p.set_defaults(func=cmd_flops)


def _add_train(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--precision", choices=typing.get_args(Precision), help="autocast precision (EM stays fp32)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: mIoU, aAcc, mAcc, fwIoU and a per-class table")
    p.add_argument("checkpoint", help="a model folder, a checkpoint file or a run folder (its newest checkpoint)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="e.g. eval.scales=[0.5,0.75,1,1.25,1.5,1.75] eval.flip=true eval.eval_stages=5 data.root=/data/voc",
    )
    p.add_argument("--config", help="a YAML file instead of the checkpoint's own config")
    p.add_argument("--device", help="cpu, cuda (default: auto)")
    p.add_argument("--precision", choices=typing.get_args(Precision), help="autocast precision (EM stays fp32)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--no-prepare", action="store_true", help=NO_PREPARE_HELP)
    p.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images")
    p.add_argument("--out", help="JSON file for the results (default: next to the checkpoint)")
    plot_help = "also OUT_confusion.png (row-normalised) and OUT_iou.png (per-class IoU) beside it; emanet[report]"
    p.add_argument("--plot", action="store_true", help=plot_help)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train EMANet and FCN on the synthetic context set (CPU) and write a report")
    p.add_argument("--out", default="reports/demo", help="report folder (default: reports/demo)")
    p.add_argument("--config", help="a YAML file instead of the built-in demo settings")
    p.add_argument("overrides", nargs="*", help="section.key=value on top, e.g. train.iterations=100")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="label maps, colour images and overlays (+ EM attention maps) for images")
    p.add_argument("source", help="a model folder (save_pretrained), a checkpoint file or a run folder")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or quoted globs")
    p.add_argument("--out", required=True, help="output folder; names mirror the inputs (NAME.png, NAME_color.png...)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward; same-size images batch (default: 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=typing.get_args(Precision), default="fp32", help="autocast (EM stays fp32)")
    p.add_argument(
        "--mode", choices=typing.get_args(Mode), help="whole image or sliding window (default: the config's)"
    )
    p.add_argument("--crop-size", type=int, nargs="+", metavar="N", help="sliding window size: N or H W")
    p.add_argument("--stride", type=int, nargs="+", metavar="N", help="sliding window stride: N or H W")
    p.add_argument("--scales", type=float, nargs="+", help="multi-scale factors, e.g. 0.75 1 1.25 (default: config's)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, help="also predict the mirrored image (averaged)")
    p.add_argument("--eval-stages", type=int, help="EM iterations T at test time (default: the model's)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--no-prepare", action="store_true", help=NO_PREPARE_HELP)
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the colours in NAME_overlay.png (default: 0.5)")
    p.add_argument("--attention", action="store_true", help="write NAME_attention.png: the heaviest EM bases' maps")
    p.add_argument("--attention-bases", type=int, default=6, help="bases shown with --attention (default: 6)")
    p.add_argument("--save-arrays", action="store_true", help="also NAME_attention.npz, raw responsibilities (K, h, w)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="the paper's studies: T_train x T_eval grid (iterations) or bases "
        "maintenance and gradients (bases); resumable",
    )
    p.add_argument("study", choices=("iterations", "bases"), help="which study")
    p.add_argument("--config", help="YAML file or packaged recipe name (e.g. synthetic_toy, voc_reference)")
    p.add_argument("overrides", nargs="*", help="section.key=value for every variant, e.g. data.root=/data/voc")
    p.add_argument("--out", required=True, help="the study folder (run the same command again to continue)")
    p.add_argument("--train-stages", type=_int_list, metavar="T,T", help="iterations: T_train (default: 1,2,3,4,5)")
    p.add_argument("--eval-stages", type=_int_list, metavar="T,T", help="iterations: T_eval (default: 1,...,8)")
    p.add_argument(
        "--variants",
        type=lambda v: v.split(","),
        metavar="NAME,NAME",
        help="bases: a subset of ema,ema_l2,learned,none,ema_grad_all,ema_grad_last (default: all)",
    )
    p.add_argument(
        "--run",
        action="append",
        metavar="NAME=PATH",
        help="use an existing run for a variant instead of training it (e.g. T3=runs/voc); repeatable",
    )
    p.add_argument("--max-images", type=int, default=0, help="evaluate on the first N validation images (0 = all)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_study)


def _add_push_to_hub(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push-to-hub",
        help="upload a model folder, run or checkpoint to the Hugging Face Hub "
        "with a generated model card (pip install emanet[hub]; log in with `hf auth login`)",
    )
    p.add_argument("source", help="a model folder, a checkpoint file or a run folder")
    p.add_argument("repo_id", help="user/name on the Hub (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", help="a branch to push to (default: main)")
    p.set_defaults(func=cmd_push_to_hub)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed benchmarks of the EM attention and the whole model")
    p.add_argument("--out", default="benchmarks", help="folder for results.md / results.json (default: benchmarks)")
    parts = ("em", "model", "compile")
    p.add_argument("--parts", nargs="+", default=parts, choices=parts, help="what to run (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
    p.set_defaults(func=cmd_bench)


def _add_check_data(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--max-files", type=int, metavar="N", help="scan only the first N samples of each split")
    p.add_argument("--show", type=int, default=50, metavar="N", help="problems printed per split (default: 50)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_check_data)


def _add_convert(sub: argparse._SubParsersAction) -> None:
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
        help="load with weights_only=False (runs pickled code: only for files you trust)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.set_defaults(func=cmd_convert)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX (dynamic batch/H/W), optionally checked against "
        "PyTorch with onnxruntime (docs/export.md)",
    )
    p.add_argument("source", help="a model folder (save_pretrained), a checkpoint file or a run folder")
    p.add_argument("overrides", nargs="*", help="section.key=value on the saved config, e.g. model.eval_stages=5")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="(default: onnx)")
    p.add_argument("--out", default="model.onnx", help="the ONNX file to write (default: model.onnx)")
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
        default=1e-4,  # emanet.export.TOLERANCE
        help="largest accepted absolute logit difference for --check (default: 1e-4)",
    )
    p.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    from emanet import __version__

    parser = argparse.ArgumentParser(prog="emanet", description="EMANet semantic segmentation")
    parser.add_argument("--version", action="version", version=f"emanet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_configs,
        _add_flops,
        _add_train,
        _add_eval,
        _add_demo,
        _add_predict,
        _add_study,
        _add_push_to_hub,
        _add_bench,
        _add_check_data,
        _add_convert,
        _add_export,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`emanet eval RUN --device cpu eval.flip=true`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    def show_warning(message, category, filename, lineno, file=None, line=None):  # no source line
        print(f"emanet {args.command}: warning: {message}", file=sys.stderr)

    shown_before, warnings.showwarning = warnings.showwarning, show_warning
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user mistakes: a message, not a traceback
        print(f"emanet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only folder, full disk: the path and the OS reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"emanet {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown_before
