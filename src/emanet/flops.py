"""Parameters and FLOPs of a model, split the way the paper's Table 1 reports them.

FLOPs here are multiply-adds, as the paper counts them: an (m x n)(n x p) product is m*n*p, a conv is
C_in*C_out*k*k per output pixel. torch's FlopCounterMode counts 2 per multiply-add; we halve it. BN, ReLU,
softmax, normalisation and interpolation count 0 (in the paper's table too: they are memory-bound).
The model runs on the meta device: shapes only, no arithmetic, so ResNet-101 at 513x513 costs milliseconds.

Parts:
- backbone
- increment: the reduction conv (fc0) + the context module (EMA unit: its two 1x1 convs and the EM
  products; non-local block; nothing for FCN). This is what Table 1 lists as "+FLOPs / +params".
- rest: the conv after the context module, the classifier and the auxiliary head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from emanet.models.emanet import ModelConfig, SegmentationModel, build_model

# Paper Table 1 (ResNet-101 deep stem, OS8, 513x513): multiply-adds and parameters.
PAPER_TABLE1 = {
    "ResNet-101 backbone": (190.6e9, 42.6e6),
    "EMANet(512) increment": (43.1e9, 10.0e6),
    "EMANet(256) increment": (21.1e9, 4.87e6),
    "DeepLabV3 increment": (63.4e9, 15.5e6),
    "DeepLabV3+ increment": (84.1e9, 16.3e6),
}


@dataclass
class PartCost:
    macs: float
    params: int


@dataclass
class ModelCost:
    size: tuple[int, int]
    backbone: PartCost
    increment: PartCost
    rest: PartCost

    @property
    def total(self) -> PartCost:
        parts = (self.backbone, self.increment, self.rest)
        return PartCost(sum(p.macs for p in parts), sum(p.params for p in parts))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total"] = dataclasses.asdict(self.total)
        return d


def _params(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def _macs(fn, *args):
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return out, counter.get_total_flops() / 2


@torch.no_grad()
def count_model(model: SegmentationModel, size: tuple[int, int], batch: int = 1) -> ModelCost:
    """Count a built model part by part (per image). The model may live on the meta device."""
    model = model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(batch, 3, *size, device=device)
    head = model.head
    feats, bb = _macs(model.backbone, x)
    reduced, red = _macs(head.reduce, feats[-1])
    _, ctx = _macs(head.context, reduced)
    _, total = _macs(model, x)
    rest_macs = total - bb - red - ctx
    if model.aux_head is not None:  # eval-mode forward skips it; count it all the same
        _, aux = _macs(model.aux_head, feats[-2])
        rest_macs += aux
    rest_modules = [m for n, m in head.named_children() if n not in ("reduce", "context")] + [model.aux_head]
    return ModelCost(
        size=tuple(size),
        backbone=PartCost(bb / batch, _params(model.backbone)),
        increment=PartCost((red + ctx) / batch, _params(head.reduce, head.context)),
        rest=PartCost(rest_macs / batch, _params(*rest_modules)),
    )


def count_config(cfg: ModelConfig, size: tuple[int, int]) -> ModelCost:
    cfg = dataclasses.replace(cfg, pretrained_backbone=None)
    with torch.device("meta"):
        model = build_model(cfg)
    return count_model(model, size)


def table1(size: tuple[int, int] = (513, 513)) -> list[dict]:
    """Our counts beside the paper's Table 1 (ResNet-101 deep stem, OS8), plus the non-local head."""
    base = ModelConfig(arch="emanet", backbone="resnet101", stem="deep", output_stride=8, num_bases=64, num_stages=3)
    ema512 = count_config(base, size)
    ema256 = count_config(dataclasses.replace(base, channels=256), size)
    nl512 = count_config(dataclasses.replace(base, arch="nonlocal"), size)
    fcn = count_config(dataclasses.replace(base, arch="fcn"), size)
    rows = [
        ("ResNet-101 backbone", ema512.backbone),
        ("EMANet(512) increment", ema512.increment),
        ("EMANet(256) increment", ema256.increment),
        ("Non-local(512) increment", nl512.increment),
        ("FCN(512) increment (fc0 only)", fcn.increment),
    ]
    out = []
    for name, cost in rows:
        paper = PAPER_TABLE1.get(name) if tuple(size) == (513, 513) else None
        out.append(
            {
                "part": name,
                "gmacs": cost.macs / 1e9,
                "mparams": cost.params / 1e6,
                "paper_gmacs": paper[0] / 1e9 if paper else None,
                "paper_mparams": paper[1] / 1e6 if paper else None,
            }
        )
    return out


def _pct(ours: float, paper: float | None) -> str:
    return f"{100 * (ours - paper) / paper:+.1f}%" if paper else ""


def format_table1(rows: list[dict]) -> str:
    head = f"{'part':<32}{'GMACs':>9}{'paper':>9}{'diff':>8}{'Mparams':>10}{'paper':>9}{'diff':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        pg, pp = r["paper_gmacs"], r["paper_mparams"]
        lines.append(
            f"{r['part']:<32}{r['gmacs']:>9.2f}{(f'{pg:.1f}' if pg else '-'):>9}{_pct(r['gmacs'], pg):>8}"
            f"{r['mparams']:>10.3f}{(f'{pp:.3g}' if pp else '-'):>9}{_pct(r['mparams'], pp):>8}"
        )
    return "\n".join(lines)


def format_model_cost(cost: ModelCost) -> str:
    lines = [f"input {cost.size[0]}x{cost.size[1]}: {'part':<12}{'GMACs':>10}{'Mparams':>10}"]
    for name in ("backbone", "increment", "rest", "total"):
        part = getattr(cost, name)
        lines.append(f"{'':<{len('input 513x513: ')}}{name:<12}{part.macs / 1e9:>10.2f}{part.params / 1e6:>10.3f}")
    return "\n".join(lines)
