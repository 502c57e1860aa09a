"""The `emanet` command line's flags: one argparse sub-parser per command, and `build_parser`.

Only definitions: nothing here runs a command. `emanet.cli.main` holds the handlers and passes them to
`build_parser`, which binds each sub-parser to its handler (`args.func`), so imports point one way.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Mapping

from emanet.fields import field_choices
from emanet.inference import Mode
from emanet.models.backbone import BACKBONES
from emanet.models.emanet import OUTPUT_STRIDES, ModelConfig
from emanet.runtime import Precision

Handler = Callable[[argparse.Namespace], int]

COMPILE_HELP = "torch.compile the model (opt-in: tens of seconds of compiling before the first image or step)"
NO_PREPARE_HELP = (
    "run the model as loaded: no BatchNorm folding or ReLU fusion, no channels_last (slower, same results)"
)


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


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(**{name: getattr(args, name) for _, name, _ in MODEL_FLAGS}, aux=args.aux)


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {value!r}") from None


def _add_configs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="list the packaged YAML recipes (use them with --config NAME)")
    p.add_argument("--show", metavar="NAME", help="print one recipe (to copy and edit)")


def _add_flops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="parameters and multiply-adds, beside the paper's Table 1")
    _model_args(p)
    p.add_argument("--size", type=int, nargs=2, default=(513, 513), metavar=("H", "W"), help="(default: 513 513)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--no-paper", action="store_true", help="skip the Table 1 comparison")


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


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train EMANet and FCN on the synthetic context set (CPU) and write a report")
    p.add_argument("--out", default="reports/demo", help="report folder (default: reports/demo)")
    p.add_argument("--config", help="a YAML file instead of the built-in demo settings")
    p.add_argument("overrides", nargs="*", help="section.key=value on top, e.g. train.iterations=100")
    p.add_argument("--no-progress", action="store_true")


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


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed benchmarks of the EM attention and the whole model")
    p.add_argument("--out", default="benchmarks", help="folder for results.md / results.json (default: benchmarks)")
    parts = ("em", "model", "compile")
    p.add_argument("--parts", nargs="+", default=parts, choices=parts, help="what to run (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")


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
        default=1e-4,  # emanet.deploy.export.TOLERANCE
        help="largest accepted absolute logit difference for --check (default: 1e-4)",
    )


def build_parser(handlers: Mapping[str, Handler]) -> argparse.ArgumentParser:
    """The full parser; ``handlers`` maps each subcommand's name to the function that runs it."""
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
    unmatched = sorted(set(sub.choices) ^ set(handlers))
    if unmatched:
        raise TypeError(f"subcommands and handlers differ on {unmatched}: give each subcommand one handler")
    for name, p in sub.choices.items():
        p.set_defaults(func=handlers[name])
    return parser
