"""EMANet assembly, builders and ModelConfig."""

from __future__ import annotations

import pytest
import torch

from emanet.models.emanet import (
    MODELS,
    ModelConfig,
    SegmentationModel,
    build_model,
    emanet_resnet101,
    layer4_dilations,
)

TINY = dict(
    backbone="resnet18", backbone_width=16, stem="standard", num_classes=3, channels=16, mid_channels=8, num_bases=4
)


@pytest.mark.parametrize("arch", ["emanet", "fcn", "nonlocal"])
@pytest.mark.parametrize("layout", ["reference", "mmseg"])
def test_forward_backward_at_odd_size(arch, layout):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, head_layout=layout, **TINY)).train()
    x = torch.randn(2, 3, 65, 47)
    out = model(x)
    assert out.shape == (2, 3, 65, 47)
    out.logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # every trainable parameter gets a gradient: DDP needs no find_unused_parameters
    assert missing == []


def test_aux_head_in_training_only():
    model = build_model(ModelConfig(aux=True, **TINY))
    out = model.train()(torch.randn(2, 3, 33, 33))
    assert set(out) == {"out", "aux"} and out["aux"].shape == (2, 3, 33, 33)
    assert isinstance(model.eval()(torch.randn(1, 3, 33, 33)), torch.Tensor)


def test_default_emanet_freezes_only_the_em_in_conv():
    model = build_model(ModelConfig(**TINY))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["head.context.conv_in.weight", "head.context.conv_in.bias"]


def test_reference_dilations_and_builders():
    assert layer4_dilations(8) == (2, 8, 16) and layer4_dilations(16) == (1, 4, 8)
    with torch.device("meta"):
        model = emanet_resnet101(num_classes=21, output_stride=8)
    assert isinstance(model, SegmentationModel)
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [2, 8, 16]
    assert model.head.classifier.out_channels == 21
    with pytest.raises(TypeError):
        emanet_resnet101(21)  # keyword-only
    assert set(MODELS) >= {"emanet_resnet50", "emanet_resnet101", "fcn_resnet101", "nonlocal_resnet101"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": "deeplab"}, "model.arch"),
        ({"backbone": "vgg16"}, "model.backbone"),
        ({"output_stride": 4}, "output_stride"),
        ({"num_bases": 0}, "num_bases"),
        ({"head_layout": "psp"}, "head_layout"),
    ],
)
def test_config_refuses_impossible_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_key():
    cfg = ModelConfig(**TINY)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="num_base"):
        ModelConfig.from_dict({"num_base": 8})


def test_eval_stages_reach_the_unit():
    model = build_model(ModelConfig(eval_stages=7, **TINY))
    unit = model.head.context
    assert unit.eval().stages == 7 and unit.train().stages == 3


@pytest.mark.parametrize("arch", ["emanet", "nonlocal"])
def test_every_conv_starts_from_the_reference_fan_out_init(arch):
    # backbone, head and context module share one init: normal(0, sqrt(2 / (k*k*C_out))), zero biases,
    # norm weight 1 / bias 0 (the non-local block's last BN is the exception: zero weight, an identity start)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, backbone="resnet50", stem="deep", num_classes=3))
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 50_000:
            expected = (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5
            assert abs(m.weight.std().item() / expected - 1) < 0.05, name
            assert abs(m.weight.mean().item()) < 0.05 * expected, name
            assert m.bias is None or not m.bias.any(), name
            checked += 1
        elif isinstance(m, torch.nn.BatchNorm2d) and not (arch == "nonlocal" and name.endswith("context.bn")):
            assert bool((m.weight == 1).all() and (m.bias == 0).all()), name
    assert checked > 40  # backbone, reduction conv, context module and classifier convs
