"""Segmentation heads: the EMA head and its baselines, all returning logits at feature resolution.

Every head is ``reduce -> context -> fuse -> (concat) -> dropout -> classifier``; only the context module
differs (EMA unit, non-local block, or nothing for the FCN baseline), so comparisons share every other conv.

Layouts:
- "reference" (the authors' code): fc0 3x3 C_in->512 BN ReLU -> context -> fc1 3x3 512->256 BN ReLU ->
  Dropout2d(0.1) -> fc2 1x1 -> classes.
- "mmseg" (mmsegmentation's EMAHead): ema_in_conv 3x3 -> context -> bottleneck 3x3 512->256 ->
  conv_cat 3x3 on concat[C5, .] (C_in+256 -> 256) -> Dropout2d(0.1) -> conv_seg 1x1.
"""

from __future__ import annotations

import typing
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emanet.fields import one_of
from emanet.models.em import conv_init_

HeadLayout = Literal["reference", "mmseg"]
NormLayer = Callable[[int], nn.Module]


class ConvBNReLU(nn.Sequential):
    """conv (no bias) -> norm -> ReLU; children named conv/bn/relu as in both source code bases."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
                bn=norm_layer(cout),
                relu=nn.ReLU(inplace=True),
            )
        )


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al. 2018): the O(N^2) baseline EM attention replaces.

    y = x + BN(W(softmax(theta(x)^T phi(x)) g(x))), with the BN weight starting at 0 so the block starts
    as the identity, as its paper recommends.
    """

    def __init__(self, channels: int, reduction: int = 2, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        inter = max(1, channels // reduction)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.out = nn.Conv2d(inter, channels, 1, bias=False)
        self.bn = norm_layer(channels)
        conv_init_(self)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2)  # (B, C', N)
        phi = self.phi(x).flatten(2)  # (B, C', N)
        g = self.g(x).flatten(2)  # (B, C', N)
        # One image at a time with 2-D GEMMs: batched bmm on these (N, N) operands measured up to 20x
        # slower on CPU, which would flatter EM attention in the benchmarks.
        ys = []
        for i in range(b):
            attn = torch.softmax(theta[i].t() @ phi[i], dim=-1)  # (N, N): the quadratic term
            ys.append(attn @ g[i].t())  # (N, C')
        y = torch.stack(ys).transpose(1, 2).reshape(b, -1, h, w)  # (B, C', H, W)
        return x + self.bn(self.out(y))


class SegHead(nn.Module):
    """reduce -> context -> fuse -> [concat with C5 -> conv_cat] -> dropout -> classifier."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        context: nn.Module | None = None,
        channels: int = 512,
        mid_channels: int = 256,
        layout: HeadLayout = "reference",
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if layout not in typing.get_args(HeadLayout):
            raise ValueError(f"head layout must be {one_of(typing.get_args(HeadLayout))}, got {layout!r}")
        self.layout = layout
        self.reduce = ConvBNReLU(in_channels, channels, 3, norm_layer)
        self.context = context if context is not None else nn.Identity()
        self.fuse = ConvBNReLU(channels, mid_channels, 3, norm_layer)
        # mmseg re-reads the backbone's C5 next to the context features before classifying
        self.cat = ConvBNReLU(in_channels + mid_channels, mid_channels, 3, norm_layer) if layout == "mmseg" else None
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(mid_channels, num_classes, 1)
        conv_init_(self.reduce)
        conv_init_(self.fuse)
        if self.cat is not None:
            conv_init_(self.cat)
        conv_init_(self.classifier)

    def forward(self, c5: Tensor) -> Tensor:
        x = self.fuse(self.context(self.reduce(c5)))
        if self.cat is not None:
            x = self.cat(torch.cat([c5, x], dim=1))
        return self.classifier(self.dropout(x))


class FCNAuxHead(nn.Module):
    """Auxiliary FCN head on layer3 (mmsegmentation's, loss weight 0.4): 3x3 conv -> dropout -> 1x1."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels: int = 256,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3, norm_layer)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        conv_init_(self)

    def forward(self, c4: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(c4)))


def upsample_like(logits: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)
