"""`emanet flops`: parameters and multiply-adds of a model, beside the paper's Table 1."""

from __future__ import annotations

import argparse
import dataclasses
import json

from emanet.fields import field_choices
from emanet.flops import count_config, format_model_cost, format_table1, table1
from emanet.models.backbone import BACKBONES, OUTPUT_STRIDES
from emanet.models.emanet import ModelConfig

# the model flags: (flag, ModelConfig field, help); defaults and allowed values come from ModelConfig
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


EXAMPLE = """examples:
  emanet flops                                         the reference EMANet at 513x513, beside Table 1
  emanet flops --backbone resnet50 --output-stride 16  another model
  emanet flops --arch fcn --size 769 769 --json        the FCN baseline, as JSON"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="parameters and multiply-adds, beside the paper's Table 1")
    g = p.add_argument_group("model")
    defaults = ModelConfig()
    extra_choices = {"backbone": tuple(BACKBONES), "output_stride": tuple(OUTPUT_STRIDES)}
    for flag, name, what in MODEL_FLAGS:
        default = getattr(defaults, name)
        allowed = field_choices(ModelConfig, name) or extra_choices.get(name)
        g.add_argument(flag, type=type(default), default=default, choices=allowed, help=f"{what} (default: {default})")
    g.add_argument("--aux", action="store_true", help="add the auxiliary FCN head on layer3")
    p.add_argument("--size", type=int, nargs=2, default=(513, 513), metavar=("H", "W"), help="(default: 513 513)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--no-paper", action="store_true", help="skip the Table 1 comparison")
    p.set_defaults(func=run)


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(**{name: getattr(args, name) for _, name, _ in MODEL_FLAGS}, aux=args.aux)


def run(args: argparse.Namespace) -> int:
    size = tuple(args.size)
    cfg = model_config(args)
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
