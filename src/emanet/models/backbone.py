"""Dilated ResNets that return the four stage feature maps (no pooling, no classifier).

Key layouts (state-dict names are a contract: checkpoint converters map other formats onto them)
- stem="standard" (torchvision): ``conv1`` 7x7 s2 3->64, ``bn1``, ReLU, ``maxpool``.
  Keys ``conv1.weight``, ``bn1.*``. torchvision ImageNet files load directly; their ``fc.*`` is ignored.
- stem="deep" (EMANet reference / PyTorch-Encoding): ``conv1`` is a Sequential of three 3x3 convs
  (3->64 s2, 64->64, 64->128) with BN+ReLU between them, then ``bn1`` = BN(128), ReLU, ``maxpool``.
  Keys ``conv1.{0,3,6}.weight``, ``conv1.{1,4}.*``, ``bn1.*``; layer1 takes 128 channels.
- stem="v1c" (mmsegmentation ResNetV1c): ``stem`` is a Sequential of three conv-BN-ReLU (3->32 s2, 32->32,
  32->64), then ``maxpool``. Keys ``stem.{0,3,6}.weight``, ``stem.{1,4,7}.*``; no ``conv1``/``bn1``.
- Stages: ``layerL.i.conv{1,2,3}`` / ``bn{1,2,3}``; first block ``layerL.0.downsample.{0,1}`` (1x1 conv, BN).
  The stride sits on the 3x3 conv (torchvision v1.5, the reference, mmsegmentation); no conv has a bias.

Output stride (OS) by dilation instead of striding, per stage (layer1, layer2, layer3, layer4), as the table
``OUTPUT_STRIDES`` lists:
- OS32: dilations (1, 1, 1, 1); OS16: layer4 stride 1, dilation 2; OS8: layer3 and layer4 stride 1,
  dilations 2 and 4.
- The first block of a dilated stage uses half the stage dilation (the previous stage's), as torchvision's
  ``replace_stride_with_dilation`` and mmsegmentation do: OS8 gives layer3 (1, 2, 2, ...), layer4 (2, 4, 4).
- ``layer4_dilations`` overrides layer4 block by block. The EMANet reference uses (2, 8, 16) at OS8 and
  (1, 4, 8) at OS16: multi-grid (1, 2, 4) times the stage dilation, with the first grid value ignored.
- Every 3x3 conv pads by its dilation, so sizes follow floor((n + 2p - k) / s) + 1 exactly as torchvision:
  513 -> 257 (stem) -> 129 (maxpool, layer1) -> 65 (layer2) -> 33 or 65 (layer3) -> 17, 33 or 65 (layer4).

Builders: ``RESNETS`` is the one table of depths, ``resnet(name, ...)`` and ``BACKBONES`` / ``resnet50`` ...
build from it. Reading and checking weight files (``load_backbone_weights``) is in backbone_weights.py.
"""

from __future__ import annotations

import functools
import os
import typing
from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor, nn

from emanet.fields import one_of

# Weight files are read and checked in backbone_weights.py (the builders' ``weights=`` loads through it); the
# loader, its report and the file reader stay importable from here too.
from emanet.models.backbone_weights import LoadReport as LoadReport
from emanet.models.backbone_weights import load_backbone_weights
from emanet.models.backbone_weights import read_weights_file as read_weights_file
from emanet.models.em import conv_init_

NormLayer = Callable[[int], nn.Module]
Stem = Literal["standard", "deep", "v1c"]  # torchvision, the reference (PyTorch-Encoding), mmseg ResNetV1c
STEMS: tuple[str, ...] = typing.get_args(Stem)


# ----------------------------------------------------------------------------- helpers


def conv3x3(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """A 3x3 conv without bias whose padding keeps the size at stride 1 for any dilation."""
    # padding = dilation keeps the size at stride 1 for any dilation; no bias since a norm layer follows.
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """A 1x1 conv without bias."""
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


# ----------------------------------------------------------------------------- blocks


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); both use ``dilation``."""

    expansion = 1

    def __init__(
        self,
        c_in: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, planes, stride, dilation)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride, dilation) -> 1x1 expand by 4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(
        self,
        c_in: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(c_in, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)  # stride here: torchvision v1.5
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


# ----------------------------------------------------------------------------- model


# output stride -> (strides, dilations) of layer1..layer4: the one table of the layouts this package builds
# (ModelConfig's allowed output strides, the multi-grid's layer4 dilation and the mmseg converter read it)
OUTPUT_STRIDES: dict[int, tuple[tuple[int, int, int, int], tuple[int, int, int, int]]] = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}


def stage_dilations(output_stride: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(strides, dilations) of layer1..layer4 for an output stride."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be {one_of(tuple(OUTPUT_STRIDES))}, got {output_stride}")
    return OUTPUT_STRIDES[output_stride]


def _block_dilations(
    layers: Sequence[int], dilations: Sequence[int], layer4_dilations: Sequence[int] | None
) -> list[tuple[int, ...]]:
    """Per-block dilations of layer1..layer4: the first block of a dilated stage keeps the previous stage's
    dilation (half the stage's), so the receptive field grows smoothly across the stage boundary."""
    per_block = [(max(d // 2, 1),) + (d,) * (n - 1) for n, d in zip(layers, dilations)]
    if layer4_dilations is not None:
        layer4_dilations = tuple(int(d) for d in layer4_dilations)
        if len(layer4_dilations) != layers[3] or min(layer4_dilations) < 1:
            raise ValueError(
                f"layer4_dilations needs one positive dilation per layer4 block ({layers[3]} blocks), "
                f"got {layer4_dilations}"
            )
        per_block[3] = layer4_dilations
    return per_block


class ResNet(nn.Module):
    """ResNet trunk; ``forward`` returns [layer1, layer2, layer3, layer4] at strides 4, 8, 16|8, 32|16|8."""

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        stem: str = "standard",
        output_stride: int = 32,
        layer4_dilations: Sequence[int] | None = None,
        norm_layer: NormLayer | None = None,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        w = width  # layer1's planes; 64 in every published ResNet, smaller for CPU demos
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(map(repr, STEMS))}, got {stem!r}")
        if len(layers) != 4:
            raise ValueError(f"layers needs one block count per stage (4 values), got {tuple(layers)}")
        strides, dilations = stage_dilations(output_stride)
        norm = norm_layer or nn.BatchNorm2d
        self.stem_type = stem
        self.layers = tuple(layers)
        self.output_stride = output_stride

        # Stem: /2 by the first conv, /2 by the max-pool -> stride 4 before layer1.
        stem_out = self._make_stem(stem, in_channels, w, norm)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        per_block = _block_dilations(layers, dilations, layer4_dilations)
        c_in, widths = stem_out, (w, 2 * w, 4 * w, 8 * w)
        stages = []
        for planes, stride, dils in zip(widths, strides, per_block):
            stages.append(self._make_layer(block, c_in, planes, stride, dils, norm))
            c_in = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        # Nominal strides (exact for sizes divisible by 32; odd sizes round up at each /2).
        feat_strides = [4]
        for s in strides[1:]:
            feat_strides.append(feat_strides[-1] * s)
        self.feature_info = [
            {"name": f"layer{i + 1}", "channels": w * block.expansion, "stride": st}
            for i, (w, st) in enumerate(zip(widths, feat_strides))
        ]
        self.out_channels = widths[-1] * block.expansion

        conv_init_(self)  # the reference's fan-out normal init; BN weight 1, bias 0

    def _make_stem(self, stem: str, c_in: int, w: int, norm: NormLayer) -> int:
        """Add the stem's modules (``conv1`` + ``bn1``, or ``stem``) under their checkpoint names; return its
        output channels."""
        if stem == "standard":
            self.conv1 = nn.Conv2d(c_in, w, 7, stride=2, padding=3, bias=False)
            self.bn1 = norm(w)
            return w
        if stem == "deep":
            # The last conv has no norm inside the Sequential: its BN is `bn1`, so the keys line up with
            # PyTorch-Encoding's files (conv1.0/1/3/4/6, bn1).
            self.conv1 = nn.Sequential(
                conv3x3(c_in, w, stride=2),
                norm(w),
                nn.ReLU(inplace=True),
                conv3x3(w, w),
                norm(w),
                nn.ReLU(inplace=True),
                conv3x3(w, 2 * w),
            )
            self.bn1 = norm(2 * w)
            return 2 * w
        # v1c
        self.stem = nn.Sequential(
            conv3x3(c_in, w // 2, stride=2),
            norm(w // 2),
            nn.ReLU(inplace=True),
            conv3x3(w // 2, w // 2),
            norm(w // 2),
            nn.ReLU(inplace=True),
            conv3x3(w // 2, w),
            norm(w),
            nn.ReLU(inplace=True),
        )
        return w

    @staticmethod
    def _make_layer(
        block: Block, c_in: int, planes: int, stride: int, dilations: Sequence[int], norm: NormLayer
    ) -> nn.Sequential:
        c_out = planes * block.expansion
        downsample = None
        if stride != 1 or c_in != c_out:
            # Projection shortcut; a plain 1x1 (no dilation) since it only matches stride and width.
            downsample = nn.Sequential(conv1x1(c_in, c_out, stride), norm(c_out))
        blocks = [block(c_in, planes, stride, dilations[0], downsample, norm)]
        blocks += [block(c_out, planes, 1, d, None, norm) for d in dilations[1:]]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        # x: (B, C_in, H, W)
        x = self.stem(x) if self.stem_type == "v1c" else self.relu(self.bn1(self.conv1(x)))  # (B, ., H/2, W/2)
        x = self.maxpool(x)  # (B, 64|128, H/4, W/4)
        c2 = self.layer1(x)  # (B, 64|256, H/4, W/4)
        c3 = self.layer2(c2)  # (B, 128|512, H/8, W/8)
        c4 = self.layer3(c3)  # (B, 256|1024, H/16 or H/8, ...)
        c5 = self.layer4(c4)  # (B, 512|2048, H/output_stride, ...)
        return [c2, c3, c4, c5]


# ----------------------------------------------------------------------------- builders

# name -> (block, blocks per stage): the one table of depths, shared by the builders, build_model's
# multi-grid (layer4's block count) and the converters (which read a depth back from a checkpoint's keys).
RESNETS: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),  # no published ImageNet weights; the CPU demo's small backbone
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def resnet_for_blocks(bottleneck: bool, blocks: Sequence[int]) -> str | None:
    """The RESNETS name with this block type and these blocks per stage, or None."""
    for name, (block, layers) in RESNETS.items():
        if (block is Bottleneck) == bottleneck and layers == tuple(blocks):
            return name
    return None


def resnet(
    name: str,
    *,
    stem: str = "standard",
    output_stride: int = 32,
    layer4_dilations: Sequence[int] | None = None,
    norm_layer: NormLayer | None = None,
    weights: str | os.PathLike | None = None,
    width: int = 64,
) -> ResNet:
    """A dilated ResNet of RESNETS by name, optionally with ImageNet weights from a local file (strict)."""
    if name not in RESNETS:
        raise ValueError(f"backbone must be one of {', '.join(RESNETS)}, got {name!r}")
    block, layers = RESNETS[name]
    model = ResNet(
        block,
        layers,
        stem=stem,
        output_stride=output_stride,
        layer4_dilations=layer4_dilations,
        norm_layer=norm_layer,
        width=width,
    )
    if weights is not None:
        load_backbone_weights(model, weights, strict=True)
    return model


# torchvision-style entry points, resnet50(stem="deep", ...): resnet() with the name bound, keyword-only
BACKBONES: dict[str, Callable[..., ResNet]] = {name: functools.partial(resnet, name) for name in RESNETS}
resnet10, resnet18, resnet34 = BACKBONES["resnet10"], BACKBONES["resnet18"], BACKBONES["resnet34"]
resnet50, resnet101, resnet152 = BACKBONES["resnet50"], BACKBONES["resnet101"], BACKBONES["resnet152"]
