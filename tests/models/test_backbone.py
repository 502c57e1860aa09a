"""Tests for emanet.models.backbone: layouts, output strides, key names and the depth table.

Big models are built on the meta device (shapes only, no memory, no compute); real compute uses resnet18
on inputs of 33 or 65 pixels.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from emanet.models.backbone import (
    BACKBONES,
    OUTPUT_STRIDES,
    RESNETS,
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet50,
    resnet101,
    resnet_for_blocks,
)
from emanet.models.backbone_weights import blocks_per_stage

FC_PARAMS = 2048 * 1000 + 1000  # torchvision's ImageNet classifier, absent from the dense backbone


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_shapes(model: nn.Module, size: int) -> list[tuple[int, ...]]:
    return [tuple(f.shape) for f in model(torch.empty(1, 3, size, size, device="meta"))]


# ----------------------------------------------------------------------------- architecture


def test_param_counts_match_torchvision_without_fc():
    with torch.device("meta"):
        assert n_params(resnet50()) == 25_557_032 - FC_PARAMS
        assert n_params(resnet101()) == 44_549_160 - FC_PARAMS
        # Dilation changes no parameter count.
        assert n_params(resnet101(output_stride=8)) == 44_549_160 - FC_PARAMS
        # The reference's deep-stem ResNet-101: 42.6M in the EMANet paper's Table 1.
        assert round(n_params(resnet101(stem="deep")) / 1e6, 1) == 42.6


SIZES = {  # output_stride -> {input size: layer1..layer4 sizes}, from floor((n + 2p - k) / s) + 1
    32: {65: [17, 9, 5, 3], 513: [129, 65, 33, 17]},
    16: {65: [17, 9, 5, 5], 513: [129, 65, 33, 33]},
    8: {65: [17, 9, 9, 9], 513: [129, 65, 65, 65]},
}


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize(("builder", "stem"), [(resnet18, "standard"), (resnet18, "v1c"), (resnet50, "deep")])
def test_stage_sizes_follow_conv_arithmetic(output_stride, builder, stem):
    with torch.device("meta"):
        model = builder(stem=stem, output_stride=output_stride)
    for size, expected in SIZES[output_stride].items():
        shapes = meta_shapes(model, size)
        assert [s[2] for s in shapes] == expected
        assert [s[3] for s in shapes] == expected
        assert [s[1] for s in shapes] == [f["channels"] for f in model.feature_info]


def test_resnet101_reference_config_at_513():
    with torch.device("meta"):
        model = resnet101(stem="deep", output_stride=8, layer4_dilations=(2, 8, 16))
    assert meta_shapes(model, 513)[-1] == (1, 2048, 65, 65)


def test_real_forward_matches_meta_shapes():
    torch.manual_seed(0)
    model = resnet18(output_stride=16).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 65, 65))
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 17, 17),
        (1, 128, 9, 9),
        (1, 256, 5, 5),
        (1, 512, 5, 5),
    ]
    assert all(torch.isfinite(f).all() for f in feats)


def dilations(model: ResNet, stage: str) -> list[int]:
    return [blk.conv2.dilation[0] for blk in getattr(model, stage)]


def test_dilation_conventions():
    with torch.device("meta"):
        os8, os16, os32 = (resnet101(output_stride=s) for s in (8, 16, 32))
        ref8 = resnet101(output_stride=8, layer4_dilations=(2, 8, 16))
        ref16 = resnet101(output_stride=16, layer4_dilations=(1, 4, 8))
    # OS8: first block of a dilated stage uses half the stage dilation.
    assert os8.layer3[0].conv2.dilation == (1, 1) and os8.layer3[0].conv2.padding == (1, 1)
    assert os8.layer3[1].conv2.dilation == (2, 2) and os8.layer3[1].conv2.padding == (2, 2)
    assert dilations(os8, "layer3") == [1] + [2] * 22
    assert dilations(os8, "layer4") == [2, 4, 4]
    assert dilations(os16, "layer3") == [1] * 23
    assert dilations(os16, "layer4") == [1, 2, 2]
    assert dilations(os32, "layer4") == [1, 1, 1]
    assert dilations(ref8, "layer4") == [2, 8, 16]
    assert [b.conv2.padding[0] for b in ref8.layer4] == [2, 8, 16]
    assert dilations(ref16, "layer4") == [1, 4, 8]
    # Strides: dilated stages do not stride, neither in the 3x3 nor in the shortcut.
    assert os8.layer3[0].conv2.stride == (1, 1) and os8.layer3[0].downsample[0].stride == (1, 1)
    assert os8.layer4[0].conv2.stride == (1, 1)
    assert os16.layer3[0].conv2.stride == (2, 2) and os16.layer3[0].downsample[0].stride == (2, 2)
    assert os32.layer4[0].conv2.stride == (2, 2) and os32.layer4[0].conv1.stride == (1, 1)


def test_basic_block_dilation():
    with torch.device("meta"):
        model = resnet18(output_stride=8)
    blk = model.layer4[1]
    assert isinstance(blk, BasicBlock)
    assert blk.conv1.dilation == blk.conv2.dilation == (4, 4)
    assert model.layer4[0].conv1.dilation == (2, 2)


def test_each_output_stride_of_the_table_builds_its_strides_and_dilations():
    assert sorted(OUTPUT_STRIDES) == sorted(SIZES)  # the conv arithmetic above covers every layout
    for output_stride, (strides, dilations) in OUTPUT_STRIDES.items():
        with torch.device("meta"):
            model = resnet18(output_stride=output_stride)
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
        assert [stage[0].conv1.stride[0] for stage in stages] == list(strides)
        assert [stage[-1].conv1.dilation[0] for stage in stages] == list(dilations)
        assert model.feature_info[-1]["stride"] == output_stride


@pytest.mark.parametrize("stem", ["standard", "deep", "v1c"])
@pytest.mark.parametrize(
    ("builder", "channels"),
    [(resnet18, [64, 128, 256, 512]), (resnet50, [256, 512, 1024, 2048])],
)
def test_feature_info(stem, builder, channels):
    with torch.device("meta"):
        models = {os: builder(stem=stem, output_stride=os) for os in (8, 16, 32)}
    for os, strides in ((8, [4, 8, 8, 8]), (16, [4, 8, 16, 16]), (32, [4, 8, 16, 32])):
        m = models[os]
        assert [f["name"] for f in m.feature_info] == ["layer1", "layer2", "layer3", "layer4"]
        assert [f["channels"] for f in m.feature_info] == channels
        assert [f["stride"] for f in m.feature_info] == strides
        assert m.out_channels == channels[-1]
        assert m.output_stride == os


def test_state_dict_keys_per_stem():
    with torch.device("meta"):
        std, deep, v1c = (resnet50(stem=s) for s in ("standard", "deep", "v1c"))
    std_keys, deep_keys, v1c_keys = (set(m.state_dict()) for m in (std, deep, v1c))
    assert {"conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked"} <= std_keys
    assert {
        "conv1.0.weight",
        "conv1.1.running_var",
        "conv1.3.weight",
        "conv1.4.bias",
        "conv1.6.weight",
    } <= deep_keys
    assert "conv1.6.bias" not in deep_keys and deep.bn1.num_features == 128
    assert deep.layer1[0].conv1.in_channels == 128 and deep.layer1[0].downsample[0].in_channels == 128
    assert {"stem.0.weight", "stem.1.weight", "stem.3.weight", "stem.4.bias", "stem.6.weight"} <= v1c_keys
    assert "stem.7.running_mean" in v1c_keys
    assert not any(k.startswith(("conv1", "bn1")) for k in v1c_keys)
    assert v1c.layer1[0].conv1.in_channels == 64
    for keys in (std_keys, deep_keys, v1c_keys):
        assert {
            "layer1.0.downsample.0.weight",
            "layer1.0.downsample.1.running_var",
            "layer4.2.conv3.weight",
        } <= keys
        assert not any(k.startswith(("fc.", "avgpool")) for k in keys)
        assert not any(k.endswith(".bias") and "conv" in k.split(".")[-2] for k in keys)  # no conv biases


def test_in_channels():
    with torch.device("meta"):
        assert ResNet(Bottleneck, (1, 1, 1, 1), in_channels=1).conv1.weight.shape == (64, 1, 7, 7)
        assert ResNet(Bottleneck, (1, 1, 1, 1), stem="deep", in_channels=4).conv1[0].weight.shape == (64, 4, 3, 3)
        assert ResNet(BasicBlock, (1, 1, 1, 1), stem="v1c", in_channels=2).stem[0].weight.shape == (32, 2, 3, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32, got 4"):
        resnet18(output_stride=4)
    with pytest.raises(ValueError, match="'standard', 'deep', 'v1c'"):
        resnet18(stem="v1d")
    with pytest.raises(ValueError, match="layer4_dilations.*3 blocks"), torch.device("meta"):
        resnet50(layer4_dilations=(1, 2))
    with pytest.raises(ValueError, match="4 values"):
        ResNet(BasicBlock, (2, 2, 2))


def test_norm_layer_is_used_everywhere():
    norm = functools.partial(nn.BatchNorm2d, momentum=3e-4)
    for stem in ("standard", "deep", "v1c"):
        with torch.device("meta"):
            model = resnet50(stem=stem, norm_layer=norm)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(bns) > 50 and all(m.momentum == 3e-4 for m in bns)
    with torch.device("meta"):
        gn = resnet18(norm_layer=lambda c: nn.GroupNorm(8, c))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())


def test_init():
    torch.manual_seed(0)
    model = ResNet(BasicBlock, (1, 1, 1, 1))
    w = model.layer4[0].conv2.weight  # (512, 512, 3, 3): fan_out = 9 * 512
    assert w.std().item() == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.03)
    assert abs(w.mean().item()) < 1e-3
    assert torch.all(model.layer4[0].bn2.weight == 1) and torch.all(model.layer4[0].bn2.bias == 0)


def test_forward_backward_reaches_stem():
    torch.manual_seed(0)
    model = resnet18(output_stride=8)
    feats = model(torch.randn(2, 3, 33, 33))
    assert [tuple(f.shape[2:]) for f in feats] == [(9, 9), (5, 5), (5, 5), (5, 5)]
    sum(f.square().mean() for f in feats).backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_builders_registry():
    assert set(BACKBONES) == {"resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
    expected = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
    expected |= {"resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
    with torch.device("meta"):
        for name, builder in BACKBONES.items():
            model = builder()
            assert tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5)) == expected[name]
            block = BasicBlock if name in ("resnet10", "resnet18", "resnet34") else Bottleneck
            assert isinstance(model.layer1[0], block)
    with pytest.raises(TypeError):
        resnet50("deep")  # keyword-only


def test_depth_read_back_from_keys_names_the_same_table_entry():
    # the converters read a checkpoint's depth through these two: every entry must survive the round trip,
    # under a wrapping prefix too, and a depth outside the table is None
    with torch.device("meta"):
        for name, (block, layers) in RESNETS.items():
            keys = [f"module.{k}" for k in BACKBONES[name]().state_dict()]
            assert blocks_per_stage(keys, "module.") == layers
            assert resnet_for_blocks(block is Bottleneck, blocks_per_stage(keys, "module.")) == name
    assert blocks_per_stage(["layer1.0.conv1.weight", "layer3.4.bn1.bias", "fc.weight"]) == (1, 0, 5, 0)
    assert resnet_for_blocks(True, (2, 2, 2, 2)) is None


@pytest.mark.parametrize("stem", ["standard", "deep", "v1c"])
def test_width_scales_every_stage(stem):
    model = resnet50(stem=stem, output_stride=8, width=16)
    assert [f["channels"] for f in model.feature_info] == [64, 128, 256, 512]
    feats = model(torch.randn(1, 3, 33, 33))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
    with pytest.raises(ValueError, match="width"):
        resnet18(width=0)
