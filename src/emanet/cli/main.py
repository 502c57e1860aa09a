"""Command line: `emanet <command> ...`: one handler per subcommand, and `main`.

The only module that reads argv or prints. The flags live in `emanet.cli.args`; `build_parser` hands it the
`HANDLERS` table, so that module never imports this one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from emanet.cli import args as cli_args


def cmd_flops(args: argparse.Namespace) -> int:
    from emanet.flops import count_config, format_model_cost, format_table1, table1

    size = tuple(args.size)
    cfg = cli_args.model_config(args)
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
    from emanet.bench.cpu import run_benchmarks

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
    from emanet.metrics import format_table
    from emanet.train.loop import TrainingStopped, train

    def say_why(e: TrainingStopped) -> None:  # before any rank exits: torchrun would cut rank 0 short
        if e.rank == 0:
            print(f"emanet train: {e}", file=sys.stderr, flush=True)

    cfg = _run_config(args)
    try:
        out = train(
            cfg,
            resume=args.resume,
            resume_from=args.resume_from,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            on_stop=say_why,
        )
    except TrainingStopped as e:  # run folder/write (2), signal (3) or non-finite loss (4): rank 0 said why
        return e.exit_code
    if out["rank"] == 0:
        print(format_table(out["results"], out["class_names"]))
        if out["skipped_steps"] or out["bad_samples"]:
            print(f"skipped steps (non-finite loss): {out['skipped_steps']}; bad training files: {out['bad_samples']}")
        print(f"run folder: {out['run']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from emanet.metrics import format_table
    from emanet.models.fuse import prepare_for_inference
    from emanet.pretrained import load_model
    from emanet.runtime import check_precision, maybe_compile, select_device
    from emanet.train.loop import build_datasets, evaluate, results_to_json

    if args.precision:  # before loading anything
        check_precision(select_device(args.device or "auto"), args.precision)

    # the source's own config (a --config file replaces it); overrides go on top of either
    if args.plot:
        from emanet.experiments.plots import require_matplotlib

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
        from emanet.deploy.model_card import write_model_card

        card = write_model_card(source)
        if card is not None:
            print(f"written: {card}")
    if args.plot:
        from emanet.experiments.plots import plot_class_iou, plot_confusion

        confusion = plot_confusion(results["confusion_matrix"], names, out.with_name(f"{out.stem}_confusion.png"))
        bars = plot_class_iou(results["IoU"], names, out.with_name(f"{out.stem}_iou.png"))
        print(f"written: {confusion}, {bars}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from emanet.experiments.demo import run_demo

    run_demo(args.out, args.overrides, args.config, progress=not args.no_progress)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from emanet.deploy.predict import Predictor
    from emanet.deploy.predict_files import PredictOptions, collect_inputs, predict_files
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
    from emanet.convert.checkpoints import convert

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
    from emanet.deploy.export import OnnxNotInstalled, export_onnx, model_metadata, onnx_parity, require_onnx
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
    from emanet.deploy.hub import HubError, push_to_hub

    try:
        url = push_to_hub(args.source, args.repo_id, private=args.private, revision=args.revision)
    except (ImportError, HubError) as e:
        raise ValueError(str(e)) from None
    print(f"pushed: {url}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from emanet.experiments.study import EVAL_STAGES, TRAIN_STAGES, run_study

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


HANDLERS: dict[str, cli_args.Handler] = {
    "configs": cmd_configs,
    "flops": cmd_flops,
    "train": cmd_train,
    "eval": cmd_eval,
    "demo": cmd_demo,
    "predict": cmd_predict,
    "study": cmd_study,
    "push-to-hub": cmd_push_to_hub,
    "bench": cmd_bench,
    "check-data": cmd_check_data,
    "convert": cmd_convert,
    "export": cmd_export,
}


def build_parser() -> argparse.ArgumentParser:
    """The `emanet` parser with each subcommand bound to its handler above (`args.func`)."""
    return cli_args.build_parser(HANDLERS)


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


def run() -> None:
    """The `emanet` program: ``main``'s exit code; a torchrun worker leaves without interpreter teardown.

    DistributedDataParallel keeps its process group alive after ``destroy_process_group`` (torch 2.13: the
    gloo group's three threads are still running when the interpreter finalizes), and finalizing around
    them can abort a worker ("terminate called without an active exception", SIGABRT) after a run that
    finished well, which torchrun then reports as a failed job. Every file is closed by then; output and
    logging are flushed, then the worker ends with ``os._exit``. A plain process exits normally.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_now(code)
    raise SystemExit(code)


def exit_now(code: int) -> None:
    """Flush stdout, stderr and logging, then end the process with ``code`` (no atexit, no finalization)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            stream.flush()
    os._exit(code)
