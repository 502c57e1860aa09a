"""Checkpoint import. Source checkpoints are synthesised here from a description of each format's key names
and shapes (emanet.md sections 3 and 5), not from our own state dict, and the converted models are compared
with independent functional re-implementations of the source networks."""

import argparse
import json
import os
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emanet.cli.main import main
from emanet.convert.checkpoints import convert, convert_checkpoint
from emanet.convert.mmseg_config import PUBLISHED_PIPELINES, override_text, parse_mmseg_meta
from emanet.deploy.model_card import write_model_card
from emanet.errors import ModelSourceError
from emanet.models.backbone import BACKBONES
from emanet.models.emanet import ModelConfig, build_model
from emanet.pretrained import load_model
from tests.conftest import run_cli

W, CH, MID, K, CLS = 8, 16, 8, 4, 5  # backbone width (64 in real files), EMA width, fuse width, bases, classes
R50 = (3, 4, 6, 3)

# ----------------------------------------------------------------------------- synthetic source files


def _conv(sd, key, cout, cin, k, g, bias=False):
    sd[key + "weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
    if bias:
        sd[key + "bias"] = torch.randn(cout, generator=g) * 0.1


def _bn(sd, key, c, g, tracked=True):
    sd[key + "weight"] = 0.5 + torch.rand(c, generator=g)
    sd[key + "bias"] = torch.randn(c, generator=g) * 0.1
    sd[key + "running_mean"] = torch.randn(c, generator=g) * 0.1
    sd[key + "running_var"] = 0.5 + torch.rand(c, generator=g)
    if tracked:
        sd[key + "num_batches_tracked"] = torch.tensor(1234)


def _trunk(sd, g, *, stem, stages, blocks, bottleneck=True, tracked=True, fc=False):
    """ResNet keys: stem = "deep:<conv Sequential>:<bn1>" | "v1c:<Sequential>" | "standard"; stages = 4 prefixes."""
    kind, *names = stem.split(":")
    if kind == "deep":  # 3x3 3->w s2, BN, ReLU, 3x3 w->w, BN, ReLU, 3x3 w->2w; then bn1 = BN(2w)
        seq, bn1 = names
        _conv(sd, seq + "0.", W, 3, 3, g), _bn(sd, seq + "1.", W, g, tracked)
        _conv(sd, seq + "3.", W, W, 3, g), _bn(sd, seq + "4.", W, g, tracked)
        _conv(sd, seq + "6.", 2 * W, W, 3, g), _bn(sd, bn1, 2 * W, g, tracked)
        c = 2 * W
    elif kind == "v1c":  # three conv-BN-ReLU: 3->w/2 s2, w/2->w/2, w/2->w
        (seq,) = names
        for i, (co, ci) in enumerate([(W // 2, 3), (W // 2, W // 2), (W, W // 2)]):
            _conv(sd, f"{seq}{3 * i}.", co, ci, 3, g), _bn(sd, f"{seq}{3 * i + 1}.", co, g, tracked)
        c = W
    else:  # torchvision: 7x7 conv1, bn1
        _conv(sd, "conv1.", W, 3, 7, g), _bn(sd, "bn1.", W, g, tracked)
        c = W
    exp = 4 if bottleneck else 1
    for s, (prefix, n) in enumerate(zip(stages, blocks)):
        planes = W * 2**s
        for i in range(n):
            p = f"{prefix}{i}."
            if bottleneck:
                _conv(sd, p + "conv1.", planes, c, 1, g), _bn(sd, p + "bn1.", planes, g, tracked)
                _conv(sd, p + "conv2.", planes, planes, 3, g), _bn(sd, p + "bn2.", planes, g, tracked)
                _conv(sd, p + "conv3.", planes * 4, planes, 1, g), _bn(sd, p + "bn3.", planes * 4, g, tracked)
                sd[p + "conv3.weight"] *= 0.2  # small residual branches keep 16 blocks' activations O(1)
            else:
                _conv(sd, p + "conv1.", planes, c, 3, g), _bn(sd, p + "bn1.", planes, g, tracked)
                _conv(sd, p + "conv2.", planes, planes, 3, g), _bn(sd, p + "bn2.", planes, g, tracked)
                sd[p + "conv2.weight"] *= 0.2
            if i == 0 and (s > 0 or c != planes * exp):
                _conv(sd, p + "downsample.0.", planes * exp, c, 1, g), _bn(sd, p + "downsample.1.", planes * exp, g)
            c = planes * exp
    if fc:
        sd["fc.weight"], sd["fc.bias"] = torch.randn(10, c, generator=g), torch.randn(10, generator=g)
    return c


def _bases(c, k, g):
    mu = torch.randn(1, c, k, generator=g)
    return mu / mu.norm(dim=1, keepdim=True)


def reference_state(seed=0, tracked=True):
    """The reference's EMANet(n_classes, n_layers=50) state dict: extractor.*, fc0, emau, fc1, fc2."""
    g, sd = torch.Generator().manual_seed(seed), {}
    c5 = _trunk(
        sd,
        g,
        stem="deep:extractor.0.:extractor.1.",
        stages=[f"extractor.{i}." for i in (4, 5, 6, 7)],
        blocks=R50,
        tracked=tracked,
    )
    _conv(sd, "fc0.conv.", CH, c5, 3, g), _bn(sd, "fc0.bn.", CH, g, tracked)
    sd["emau.mu"] = _bases(CH, K, g)
    _conv(sd, "emau.conv1.", CH, CH, 1, g, bias=True)
    _conv(sd, "emau.conv2.0.", CH, CH, 1, g), _bn(sd, "emau.conv2.1.", CH, g, tracked)
    _conv(sd, "fc1.0.conv.", MID, CH, 3, g), _bn(sd, "fc1.0.bn.", MID, g, tracked)
    _conv(sd, "fc2.", CLS, MID, 1, g, bias=True)
    return sd


def mmseg_state(seed=1, *, concat=True, aux=True, blocks=R50, bottleneck=True):
    """mmseg EncoderDecoder(ResNetV1c, EMAHead, FCNHead aux) state dict."""
    g, sd = torch.Generator().manual_seed(seed), {}
    c5 = _trunk(
        sd,
        g,
        stem="v1c:backbone.stem.",
        stages=[f"backbone.layer{i}." for i in range(1, 5)],
        blocks=blocks,
        bottleneck=bottleneck,
    )
    h = "decode_head."
    sd[h + "ema_module.bases"] = _bases(CH, K, g)
    _conv(sd, h + "ema_in_conv.conv.", CH, c5, 3, g), _bn(sd, h + "ema_in_conv.bn.", CH, g)
    _conv(sd, h + "ema_mid_conv.conv.", CH, CH, 1, g, bias=True)
    _conv(sd, h + "ema_out_conv.conv.", CH, CH, 1, g), _bn(sd, h + "ema_out_conv.bn.", CH, g)
    _conv(sd, h + "bottleneck.conv.", MID, CH, 3, g), _bn(sd, h + "bottleneck.bn.", MID, g)
    if concat:
        _conv(sd, h + "conv_cat.conv.", MID, c5 + MID, 3, g), _bn(sd, h + "conv_cat.bn.", MID, g)
    _conv(sd, h + "conv_seg.", CLS, MID, 1, g, bias=True)
    if aux:
        c4 = c5 // 2
        _conv(sd, "auxiliary_head.convs.0.conv.", 6, c4, 3, g), _bn(sd, "auxiliary_head.convs.0.bn.", 6, g)
        _conv(sd, "auxiliary_head.conv_seg.", CLS, 6, 1, g, bias=True)
    return sd


MMSEG_CONFIG = """norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    backbone=dict(type='ResNetV1c', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
        strides=(1, 2, 1, 1), norm_cfg=norm_cfg, norm_eval=False, style='pytorch', contract_dilation=True),
    decode_head=dict(type='EMAHead', in_channels=2048, in_index=3, channels=256, ema_channels=512, num_bases=64,
        num_stages=3, momentum=0.1, dropout_ratio=0.1, num_classes=19, norm_cfg=norm_cfg, align_corners=False),
    auxiliary_head=dict(type='FCNHead', in_channels=1024, align_corners=False),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(769, 769), stride=(513, 513)))
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=TO_RGB)
"""

# ----------------------------------------------------------------------------- independent source forwards


def _bnf(x, sd, p):
    w, b, m, v = (sd[p + n] for n in ("weight", "bias", "running_mean", "running_var"))
    return F.batch_norm(x, m, v, w, b, False, 0.0, 1e-5)


def _resnet_f(x, sd, stages, dilations):
    """Bottleneck stages with the first block's stride on its 3x3 conv; dilations per block."""
    for s, (prefix, dils) in enumerate(zip(stages, dilations)):
        for i, d in enumerate(dils):
            p, stride = f"{prefix}{i}.", (2 if s == 1 and i == 0 else 1)
            out = F.relu(_bnf(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1."))
            out = F.relu(_bnf(F.conv2d(out, sd[p + "conv2.weight"], None, stride, d, d), sd, p + "bn2."))
            out = _bnf(F.conv2d(out, sd[p + "conv3.weight"]), sd, p + "bn3.")
            idn = x
            if p + "downsample.0.weight" in sd:
                idn = _bnf(F.conv2d(x, sd[p + "downsample.0.weight"], None, stride), sd, p + "downsample.1.")
            x = F.relu(out + idn)
    return x


def _em(feats, mu, stages, l1, l2):
    b, c, h, w = feats.shape
    f = feats.reshape(b, c, h * w)
    mu = mu.repeat(b, 1, 1)
    for _ in range(stages):
        z = torch.softmax(torch.bmm(f.transpose(1, 2), mu), dim=2)  # (B, N, K)
        mu = l2(torch.bmm(f, l1(z)))  # (B, C, K)
    return torch.bmm(mu, z.transpose(1, 2)).reshape(b, c, h, w)


def reference_forward(sd, x):
    """EMANet as the reference computes it at OS8: layer3 dilations (1, 2, ...), layer4 (2, 8, 16)."""
    y = F.relu(_bnf(F.conv2d(x, sd["extractor.0.0.weight"], None, 2, 1), sd, "extractor.0.1."))
    y = F.relu(_bnf(F.conv2d(y, sd["extractor.0.3.weight"], None, 1, 1), sd, "extractor.0.4."))
    y = F.relu(_bnf(F.conv2d(y, sd["extractor.0.6.weight"], None, 1, 1), sd, "extractor.1."))
    y = F.max_pool2d(y, 3, 2, 1)
    dil = [(1,) * 3, (1,) * 4, (1,) + (2,) * 5, (2, 8, 16)]
    c5 = _resnet_f(y, sd, [f"extractor.{i}." for i in (4, 5, 6, 7)], dil)
    idn = F.relu(_bnf(F.conv2d(c5, sd["fc0.conv.weight"], None, 1, 1), sd, "fc0.bn."))
    feats = F.conv2d(idn, sd["emau.conv1.weight"], sd["emau.conv1.bias"])
    rec = _em(
        feats,
        sd["emau.mu"],
        3,
        lambda z: z / (1e-6 + z.sum(1, keepdim=True)),
        lambda m: m / (1e-6 + m.norm(dim=1, keepdim=True)),
    )
    y = F.relu(_bnf(F.conv2d(F.relu(rec), sd["emau.conv2.0.weight"]), sd, "emau.conv2.1.") + idn)
    y = F.relu(_bnf(F.conv2d(y, sd["fc1.0.conv.weight"], None, 1, 1), sd, "fc1.0.bn."))
    y = F.conv2d(y, sd["fc2.weight"], sd["fc2.bias"])
    return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)


def mmseg_forward(sd, x, align_corners=False):
    """mmseg's EncoderDecoder with ResNetV1c-d8 (contract_dilation) and EMAHead, in test mode."""
    y = x
    for i in range(3):
        y = F.conv2d(y, sd[f"backbone.stem.{3 * i}.weight"], None, 2 if i == 0 else 1, 1)
        y = F.relu(_bnf(y, sd, f"backbone.stem.{3 * i + 1}."))
    y = F.max_pool2d(y, 3, 2, 1)
    dil = [(1,) * 3, (1,) * 4, (1,) + (2,) * 5, (2, 4, 4)]  # contract_dilation: first block at half
    c5 = _resnet_f(y, sd, [f"backbone.layer{i}." for i in range(1, 5)], dil)
    h = "decode_head."
    idn = F.relu(_bnf(F.conv2d(c5, sd[h + "ema_in_conv.conv.weight"], None, 1, 1), sd, h + "ema_in_conv.bn."))
    feats = F.conv2d(idn, sd[h + "ema_mid_conv.conv.weight"], sd[h + "ema_mid_conv.conv.bias"])
    rec = _em(
        feats, sd[h + "ema_module.bases"], 3, lambda z: F.normalize(z, dim=1, p=1), lambda m: F.normalize(m, dim=1, p=2)
    )
    y = F.relu(idn + _bnf(F.conv2d(F.relu(rec), sd[h + "ema_out_conv.conv.weight"]), sd, h + "ema_out_conv.bn."))
    y = F.relu(_bnf(F.conv2d(y, sd[h + "bottleneck.conv.weight"], None, 1, 1), sd, h + "bottleneck.bn."))
    if h + "conv_cat.conv.weight" in sd:
        y = torch.cat([c5, y], dim=1)
        y = F.relu(_bnf(F.conv2d(y, sd[h + "conv_cat.conv.weight"], None, 1, 1), sd, h + "conv_cat.bn."))
    y = F.conv2d(y, sd[h + "conv_seg.weight"], sd[h + "conv_seg.bias"])
    return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=align_corners)


# hand-written renames (regex), the test's own account of where each source tensor belongs
HAND = {
    "reference": [
        (r"^extractor\.0\.", "backbone.conv1."),
        (r"^extractor\.1\.", "backbone.bn1."),
        (r"^extractor\.([4-7])\.", lambda m: f"backbone.layer{int(m.group(1)) - 3}."),
        (r"^fc0\.", "head.reduce."),
        (r"^emau\.mu$", "head.context.bases"),
        (r"^emau\.conv1\.", "head.context.conv_in."),
        (r"^emau\.conv2\.0\.", "head.context.conv_out."),
        (r"^emau\.conv2\.1\.", "head.context.bn_out."),
        (r"^fc1\.0\.", "head.fuse."),
        (r"^fc2\.", "head.classifier."),
    ],
    "mmseg": [
        (r"^decode_head\.ema_module\.bases$", "head.context.bases"),
        (r"^decode_head\.ema_in_conv\.", "head.reduce."),
        (r"^decode_head\.ema_mid_conv\.conv\.", "head.context.conv_in."),
        (r"^decode_head\.ema_out_conv\.conv\.", "head.context.conv_out."),
        (r"^decode_head\.ema_out_conv\.bn\.", "head.context.bn_out."),
        (r"^decode_head\.bottleneck\.", "head.fuse."),
        (r"^decode_head\.conv_cat\.", "head.cat."),
        (r"^decode_head\.conv_seg\.", "head.classifier."),
        (r"^auxiliary_head\.convs\.0\.", "aux_head.conv."),
        (r"^auxiliary_head\.conv_seg\.", "aux_head.classifier."),
    ],
}


def hand_map(sd, source):
    out = {}
    for k, v in sd.items():
        for pattern, repl in HAND[source]:
            new = re.sub(pattern, repl, k)
            if new != k:
                k = new
                break
        out[k] = v
    return out


X = torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(5))


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- full models


def test_reference_checkpoint_computes_what_the_reference_computes(tmp_path):
    sd = reference_state()
    torch.save({"net": sd, "step": 30000}, tmp_path / "final.pth")
    res = convert(tmp_path / "final.pth", tmp_path / "model", "reference")
    assert sorted(s for s, _ in res.mapped) == sorted(sd) and not res.dropped and not res.filled
    m = res.model_config
    assert (m.backbone, m.backbone_width, m.stem, m.channels, m.mid_channels, m.num_bases, m.num_classes) == (
        "resnet50",
        W,
        "deep",
        CH,
        MID,
        K,
        CLS,
    )
    assert (m.head_layout, m.aux, m.align_corners, m.multi_grid, m.renormalize, m.bn_momentum) == (
        "reference",
        False,
        True,
        True,
        False,
        3e-4,
    )
    loaded = load_model(tmp_path / "model")
    assert loaded.config.data.std == pytest.approx([0.229, 0.224, 0.225])  # (x/255 - MEAN) / STD since f2afd7f
    assert (loaded.config.data.eval_pad_multiple, loaded.config.data.eval_pad_offset) == (8, 1)
    with torch.no_grad():
        out, expected = loaded.model(X), reference_forward(sd, X)
        # the same tensors loaded by hand into a hand-configured model give bit-identical logits
        by_hand = build_model(
            ModelConfig(
                backbone="resnet50",
                backbone_width=W,
                channels=CH,
                mid_channels=MID,
                num_bases=K,
                num_classes=CLS,
                bn_momentum=3e-4,
            )
        )
        by_hand.load_state_dict(hand_map(sd, "reference"), strict=True)
        assert torch.equal(by_hand.eval()(X), out)
    assert out.shape == (2, CLS, 33, 33) and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_dataparallel_prefix_and_files_without_bn_counters(tmp_path):
    sd = reference_state(tracked=False)
    sd["fc2.weight"] = sd["fc2.weight"].half()  # a half-precision tensor: cast (exactly) to float32
    wrapped = {"module." + k: v for k, v in sd.items()}
    res = convert_checkpoint({"net": wrapped, "step": 5}, "reference")
    assert len(res.mapped) == len(sd) and not res.dropped
    assert res.state_dict["head.classifier.weight"].dtype == torch.float32
    assert any("torch.float16 -> torch.float32" in n for n in res.notes)
    assert res.filled and all(k.endswith("num_batches_tracked") for k, _ in res.filled)
    assert torch.equal(res.state_dict["head.context.bases"], sd["emau.mu"])
    sd["fc2.weight"] = sd["fc2.weight"].float()
    torch.testing.assert_close(res.model(X), reference_forward(sd, X), atol=1e-4, rtol=1e-4)


def test_mmseg_checkpoint_computes_what_mmseg_computes(tmp_path):
    sd = mmseg_state()
    meta = {
        "CLASSES": [f"c{i}" for i in range(CLS)],
        "PALETTE": [[i, 2 * i, 3 * i] for i in range(CLS)],
        "config": MMSEG_CONFIG.replace("TO_RGB", "True"),
    }
    torch.save({"state_dict": sd, "meta": meta}, tmp_path / "iter_80000.pth")
    res = convert(tmp_path / "iter_80000.pth", tmp_path / "model", "mmseg")
    assert sorted(s for s, _ in res.mapped) == sorted(sd) and not res.dropped
    m = res.model_config
    assert (m.stem, m.head_layout, m.aux, m.aux_channels, m.align_corners, m.multi_grid, m.renormalize) == (
        "v1c",
        "mmseg",
        True,
        6,
        False,
        False,
        True,
    )
    loaded = load_model(tmp_path / "model")
    assert loaded.class_names == [f"c{i}" for i in range(CLS)] and loaded.palette[2] == (2, 4, 6)
    assert (loaded.config.eval.mode, loaded.config.eval.crop_size, loaded.config.eval.stride) == (
        "slide",
        [769, 769],
        [513, 513],
    )
    assert loaded.config.data.mean == pytest.approx([0.485, 0.456, 0.406])
    with torch.no_grad():
        out = loaded.model(X)
        by_hand = build_model(
            ModelConfig(
                backbone="resnet50",
                backbone_width=W,
                stem="v1c",
                multi_grid=False,
                head_layout="mmseg",
                channels=CH,
                mid_channels=MID,
                num_bases=K,
                num_classes=CLS,
                aux=True,
                aux_channels=6,
                align_corners=False,
                renormalize=True,
            )
        )
        by_hand.load_state_dict(hand_map(sd, "mmseg"), strict=True)
        assert torch.equal(by_hand.eval()(X), out)
    torch.testing.assert_close(out, mmseg_forward(sd, X), atol=1e-4, rtol=1e-4)


def test_mmseg_without_concat_or_aux_and_a_bgr_model():
    sd = mmseg_state(concat=False, aux=False)
    meta = {"config": MMSEG_CONFIG.replace("TO_RGB", "False")}
    res = convert_checkpoint({"state_dict": sd, "meta": meta}, "mmseg")
    assert (res.model_config.head_layout, res.model_config.aux) == ("reference", False)
    # the BGR network fed BGR input == the converted network fed the same pixels as RGB
    with torch.no_grad():
        torch.testing.assert_close(res.model(X), mmseg_forward(sd, X.flip(1)), atol=1e-4, rtol=1e-4)


def test_aux_head_can_be_left_out_and_overrides_apply():
    sd = mmseg_state()
    res = convert_checkpoint({"state_dict": sd}, "mmseg", overrides=["model.aux=false", "model.eval_stages=5"])
    assert res.model_config.aux is False and res.model_config.eval_stages == 5
    aux = {k for k in sd if k.startswith("auxiliary_head.")}
    assert {k for k, _ in res.dropped} == aux and all("aux" in why for _, why in res.dropped)
    assert {k for k, _ in res.mapped} | aux == set(sd)


# ----------------------------------------------------------------------------- backbones


@pytest.mark.parametrize(
    "source, stem, name, builder",
    [
        (
            "torchvision",
            "standard",
            "resnet18",
            lambda sd, g: _trunk(
                sd,
                g,
                stem="standard",
                stages=[f"layer{i}." for i in range(1, 5)],
                blocks=(2, 2, 2, 2),
                bottleneck=False,
                fc=True,
            ),
        ),
        # PyTorch-Encoding's deep-stem files, from before BN counted its batches
        (
            "reference-backbone",
            "deep",
            "resnet50",
            lambda sd, g: _trunk(
                sd,
                g,
                stem="deep:conv1.:bn1.",
                stages=[f"layer{i}." for i in range(1, 5)],
                blocks=R50,
                tracked=False,
                fc=True,
            ),
        ),
        # an mmcls/mmpretrain ImageNet checkpoint: backbone.* plus a classifier head
        (
            "mmseg-backbone",
            "v1c",
            "resnet50",
            lambda sd, g: _trunk(
                sd, g, stem="v1c:backbone.stem.", stages=[f"backbone.layer{i}." for i in range(1, 5)], blocks=R50
            ),
        ),
    ],
)
def test_backbone_conversions_load_strictly(tmp_path, source, stem, name, builder):
    sd = {}
    builder(sd, torch.Generator().manual_seed(3))
    if source == "mmseg-backbone":
        sd["head.fc.weight"], sd["head.fc.bias"] = torch.randn(10, 8 * W * 4), torch.randn(10)
    res = convert(sd, tmp_path / "bb.safetensors", source)
    assert res.backbone == {"backbone": name, "backbone_width": W, "stem": stem}
    assert {k for k, _ in res.mapped} | {k for k, _ in res.dropped} == set(sd)
    assert {k for k, _ in res.dropped} == {k for k in sd if "fc." in k}
    backbone = BACKBONES[name](stem=stem, width=W)
    backbone.load_state_dict(res.state_dict, strict=True)
    for src_key, dst_key in res.mapped:
        assert torch.equal(backbone.state_dict()[dst_key], sd[src_key])
    # the written file is what model.pretrained_backbone loads (strictly)
    model = build_model(
        ModelConfig(
            backbone=name,
            backbone_width=W,
            stem=stem,
            channels=CH,
            mid_channels=MID,
            num_bases=K,
            pretrained_backbone=str(tmp_path / "bb.safetensors"),
        )
    )
    src_key, dst_key = res.mapped[-1]
    assert torch.equal(model.backbone.state_dict()[dst_key], sd[src_key])


# ----------------------------------------------------------------------------- errors


def test_bad_checkpoints_are_errors_naming_the_key():
    sd = reference_state()
    with pytest.raises(ModelSourceError, match=r"extractor\.9\.weight"):
        convert_checkpoint({**sd, "extractor.9.weight": torch.zeros(1)}, "reference")
    bad = dict(sd, **{"emau.conv2.0.weight": torch.zeros(CH, CH + 1, 1, 1)})
    with pytest.raises(
        ModelSourceError,
        match=r"emau\.conv2\.0\.weight -> head\.context\.conv_out\.weight: source "
        r"\(16, 17, 1, 1\) vs model \(16, 16, 1, 1\)",
    ):
        convert_checkpoint(bad, "reference")
    with pytest.raises(ModelSourceError, match=r"head\.fuse\.bn\.running_var \(source key fc1\.0\.bn\.running_var\)"):
        convert_checkpoint({k: v for k, v in sd.items() if k != "fc1.0.bn.running_var"}, "reference")
    with pytest.raises(ModelSourceError, match="look like a 'mmseg' checkpoint"):
        convert_checkpoint(mmseg_state(), "reference")
    with pytest.raises(ModelSourceError, match="use --from reference-backbone"):
        convert_checkpoint({k: v for k, v in sd.items() if k.startswith("extractor.")}, "torchvision")
    deep = {}
    _trunk(deep, torch.Generator(), stem="deep:conv1.:bn1.", stages=[f"layer{i}." for i in range(1, 5)], blocks=R50)
    with pytest.raises(ModelSourceError, match="'deep' stem: use --from reference-backbone"):
        convert_checkpoint(deep, "torchvision")


def test_mmseg_dilated_basic_block_is_refused():
    sd = mmseg_state(blocks=(2, 2, 2, 2), bottleneck=False, concat=False, aux=False)
    with pytest.raises(ModelSourceError, match="BasicBlock dilates only its first"):
        convert_checkpoint({"state_dict": sd}, "mmseg")
    res = convert_checkpoint({"state_dict": sd}, "mmseg", overrides=["model.output_stride=32"])
    assert res.model_config.backbone == "resnet18"


def test_cli_convert(tmp_path, capsys):
    torch.save({"net": reference_state()}, tmp_path / "ref.pth")
    assert main(["convert", "--from", "reference", str(tmp_path / "ref.pth"), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "mapped " in printed and "resnet50" in printed and (tmp_path / "out" / "config.json").is_file()
    assert not (tmp_path / "out" / "README.md").exists()  # the model card is written when the folder is pushed
    # an existing destination is not overwritten without --overwrite; a missing source is a message
    assert main(["convert", "--from", "reference", str(tmp_path / "ref.pth"), str(tmp_path / "out")]) == 2
    assert main(["convert", "--from", "mmseg", str(tmp_path / "nope.pth"), str(tmp_path / "o2")]) == 2
    assert "not found" in capsys.readouterr().err


def test_mmseg_1x_meta_and_unsupported_backbone_layouts():
    cfg = MMSEG_CONFIG.replace("to_rgb=TO_RGB", "bgr_to_rgb=True").replace("img_norm_cfg", "data_preprocessor")
    meta = {"dataset_meta": {"classes": ("road", "car"), "palette": [[1, 2, 3], [4, 5, 6]]}, "cfg": cfg}
    out = parse_mmseg_meta(meta)
    assert out["class_names"] == ["road", "car"] and out["palette"] == [(1, 2, 3), (4, 5, 6)]
    assert (
        out["model"] == {"num_stages": 3, "momentum": 0.1, "dropout": 0.1, "align_corners": False, "output_stride": 8}
        and "bgr" not in out
    )
    assert out["data"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    with pytest.raises(ModelSourceError, match="contract_dilation"):
        parse_mmseg_meta({"cfg": cfg.replace("contract_dilation=True", "contract_dilation=False")})
    with pytest.raises(ModelSourceError, match="only the d8/d16/d32 layouts"):
        parse_mmseg_meta({"cfg": cfg.replace("dilations=(1, 1, 2, 4)", "dilations=(1, 1, 1, 4)")})


def test_pickled_objects_outside_the_state_dict_are_read_as_stubs_never_run(tmp_path):
    marker = tmp_path / "ran"
    ckpt = {"net": reference_state(), "args": argparse.Namespace(lr=0.009), "evil": _RunsCode(marker)}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    res = convert_checkpoint(tmp_path / "ckpt.pth", "reference")
    assert res.model_config.num_bases == K and not marker.exists()
    assert "argparse.Namespace" in res.summary() and "posix.system" in res.summary()
    assert torch.equal(res.state_dict["head.context.bases"], ckpt["net"]["emau.mu"])


class _RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _fake_module(name, **classes):
    module = types.ModuleType(name)
    for cls_name, cls in classes.items():
        cls.__module__, cls.__qualname__ = name, cls_name
        setattr(module, cls_name, cls)
    return module


def _runner_checkpoint(path, state_dict, meta):
    """A checkpoint as mmengine's Runner saves it (meta, state_dict, message_hub, optimizer, param_schedulers),
    with objects of mmengine classes pickled inside; the classes live in fake modules that exist only while
    saving (mmengine is not installed here)."""

    class MessageHub:
        def __init__(self):
            self.log_scalars = {"train/loss": HistoryBuffer([0.5, 0.4])}
            self.runtime_info = {"iter": 80000, "lr": np.float64(0.01), "arr": np.arange(3)}

    class HistoryBuffer:
        def __init__(self, values):
            self._log_history = np.array(values)

    modules = {
        "mmengine": types.ModuleType("mmengine"),
        "mmengine.logging": types.ModuleType("mmengine.logging"),
        "mmengine.logging.message_hub": _fake_module("mmengine.logging.message_hub", MessageHub=MessageHub),
        "mmengine.logging.history_buffer": _fake_module("mmengine.logging.history_buffer", HistoryBuffer=HistoryBuffer),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, module in modules.items():
            patch.setitem(sys.modules, name, module)
        torch.save(
            {
                "meta": meta,
                "state_dict": state_dict,
                "message_hub": MessageHub(),
                "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.01}]},
                "param_schedulers": [{"eta_min": 1e-4, "power": 0.9, "last_step": 80000}],
            },
            path,
        )
    assert "mmengine" not in sys.modules


def test_an_mmengine_runner_checkpoint_converts_without_mmengine(tmp_path):
    sd = mmseg_state()
    text = (FIXTURES / "mmengine_emanet_r50-d8_4xb2-80k_cityscapes-769x769.txt").read_text()
    meta = {"cfg": text, "experiment_name": "emanet_r50-d8_4xb2-80k_cityscapes-769x769_20230101_120000"}
    _runner_checkpoint(tmp_path / "iter_80000.pth", sd, meta)
    with pytest.raises(pickle.UnpicklingError):  # what torch.load(weights_only=True) says of such a file
        torch.load(tmp_path / "iter_80000.pth", weights_only=True)
    expected = convert_checkpoint({"state_dict": sd, "meta": meta}, "mmseg")
    for allow_pickle in (False, True):  # --allow-pickle does not make it need mmengine either
        res = convert_checkpoint(tmp_path / "iter_80000.pth", "mmseg", allow_pickle=allow_pickle)
        assert res.state_dict.keys() == expected.state_dict.keys()
        assert all(torch.equal(res.state_dict[k], v) for k, v in expected.state_dict.items())
        assert res.config == expected.config and res.model_config.align_corners is True
        assert "mmengine.logging.message_hub.MessageHub" in res.summary()
    proc = run_cli("convert", "--from", "mmseg", str(tmp_path / "iter_80000.pth"), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    origin = json.loads((tmp_path / "out" / "config.json").read_text())["origin"]
    assert origin["config"] == "emanet_r50-d8_4xb2-80k_cityscapes-769x769" and origin["toolkit"] == "mmsegmentation"


def test_a_state_dict_of_pickled_objects_names_their_module(tmp_path):
    class Weird:
        pass

    sd = mmseg_state()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "mmfake", _fake_module("mmfake", Weird=Weird))
        torch.save({"state_dict": {**sd, "decode_head.extra": Weird()}, "meta": {}}, tmp_path / "w.pth")
    with pytest.raises(ModelSourceError, match=r"holds objects of mmfake\.Weird .*allow_pickle=True"):
        convert_checkpoint(tmp_path / "w.pth", "mmseg")
    with pytest.raises(ModelSourceError, match="needs the Python module 'mmfake', which is not installed"):
        convert_checkpoint(tmp_path / "w.pth", "mmseg", allow_pickle=True)


# ----------------------------------------------------------------------------- mmseg config texts in a conversion

FIXTURES = Path(__file__).parents[1] / "fixtures" / "mmseg_configs"


PUBLISHED_769 = "emanet_r50-d8_769x769_80k_cityscapes_20200901_100301-16f8de52.pth"  # mmseg's model zoo name
OVERRIDES_769 = [
    "model.align_corners=true",
    "eval.mode=slide",
    "eval.crop_size=[769,769]",
    "eval.stride=[513,513]",
    "data.eval_resize=[2049,1025]",
]


def test_mmseg_without_config_text_says_what_it_assumed(tmp_path):
    torch.save({"state_dict": mmseg_state(), "meta": {}}, tmp_path / "iter_80000.pth")
    proc = run_cli("convert", "--from", "mmseg", str(tmp_path / "iter_80000.pth"), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    warning = proc.stderr
    assert "iter_80000.pth carries no mmseg config text" in warning and "could not read its align_corners" in warning
    for assumed in ("model.align_corners=false", "eval.mode=whole", "data.eval_resize=null", "model.output_stride=8"):
        assert assumed in warning
    assert "data.dataset=voc (the config default: 5 classes match no known dataset)" in warning
    origin = json.loads((tmp_path / "out" / "config.json").read_text())["origin"]
    assert origin["config_text"] is False and "model.align_corners=false" in origin["assumed"]
    assert origin["dataset"] is None and origin["file"] == "iter_80000.pth"


def test_a_769_checkpoint_without_config_text_is_refused_unless_its_settings_are_given(tmp_path):
    torch.save({"state_dict": mmseg_state(), "meta": {}}, tmp_path / PUBLISHED_769)
    src, dst = str(tmp_path / PUBLISHED_769), tmp_path / "out"
    proc = run_cli("convert", "--from", "mmseg", src, str(dst))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "carries no mmseg config text and its name (emanet_r50-d8_769x769_80k_cityscapes) says 769x769" in proc.stderr
    )
    assert " ".join(OVERRIDES_769) in proc.stderr and "--assume-defaults" in proc.stderr
    assert not dst.exists()
    # some of the settings are not enough
    with pytest.raises(ModelSourceError, match="yours lack eval.mode, eval.crop_size"):
        convert_checkpoint(tmp_path / PUBLISHED_769, "mmseg", overrides=["model.align_corners=true"])
    res = convert_checkpoint(tmp_path / PUBLISHED_769, "mmseg", overrides=OVERRIDES_769)
    c = res.config
    assert (c.model.align_corners, c.eval.mode, c.eval.crop_size, c.eval.stride) == (
        True,
        "slide",
        [769, 769],
        [513, 513],
    )
    assert c.data.eval_resize == [2049, 1025] and res.origin["overrides"] == OVERRIDES_769
    assert res.origin["config"] == "emanet_r50-d8_769x769_80k_cityscapes"
    proc = run_cli("convert", "--from", "mmseg", src, str(dst), "--assume-defaults")
    assert proc.returncode == 0, proc.stderr
    assert "assumed model.align_corners=false, eval.mode=whole, data.eval_resize=null" in proc.stderr
    assert "says 769x769 training crops, and --assume-defaults kept the defaults" in proc.stderr


def test_names_imply_the_published_pipelines():
    sd = {"state_dict": mmseg_state(), "meta": {"exp_name": "emanet_r101-d8_512x1024_80k_cityscapes.py"}}
    with pytest.raises(
        ModelSourceError,
        match=r"overrides: model.align_corners=false eval.mode=whole data.eval_resize=\[2048,1024\] \(docs",
    ):
        convert_checkpoint(sd, "mmseg")  # align_corners=False and whole inference are our defaults already
    assert convert_checkpoint(sd, "mmseg", overrides=["data.eval_resize=[2048,1024]"]).config.data.eval_resize
    with pytest.raises(ModelSourceError, match="pass model.align_corners, eval.mode, data.eval_resize"):
        convert_checkpoint({**sd, "meta": {"exp_name": "emanet_r50-d8_512x512_80k_ade20k.py"}}, "mmseg")
    with pytest.raises(ModelSourceError, match=r"output stride 16 \(-d16\).*model.output_stride=16"):
        convert_checkpoint({**sd, "meta": {"experiment_name": "emanet_r50-d16_20230101_120000"}}, "mmseg")
    res = convert_checkpoint({**sd, "meta": {}}, "mmseg")  # a name that says nothing: converted, said
    assert "model.align_corners=false" in res.origin["assumed"]


def test_docs_show_the_overrides_of_each_published_config():
    text = (Path(__file__).parents[2] / "docs" / "convert.md").read_text()
    for crop, settings in PUBLISHED_PIPELINES.items():
        for depth in ("r50", "r101"):
            row = f"| `emanet_{depth}-d8_4xb2-80k_cityscapes-{crop[0]}x{crop[1]}` |"
            line = text.split(row, 1)[1].splitlines()[0]
            assert all(f"'{override_text(k, v)}'" in line for k, v in settings.items()), line


def test_the_model_card_says_where_a_converted_model_came_from(tmp_path):
    torch.save({"net": reference_state()}, tmp_path / "final.pth")
    convert(tmp_path / "final.pth", tmp_path / "ref", "reference", overrides=["model.output_stride=16"])
    card = write_model_card(tmp_path / "ref").read_text()
    assert "# EMANet resnet50, 5 classes\n" in card  # no dataset named: 5 classes are none we know
    assert "from `final.pth`, a checkpoint of the authors' code (XiaLiPKU/EMANet); it was trained there" in card
    assert "Settings assumed (not recorded in the file): `model.num_stages=3`" in card
    assert "Settings given at conversion: `model.output_stride=16`" in card
    assert "Training recipe" not in card and "SGD lr" not in card  # our defaults: not how it was trained

    text = (FIXTURES / "mmengine_emanet_r50-d8_4xb2-80k_cityscapes-769x769.txt").read_text()
    torch.save({"state_dict": mmseg_state(), "meta": {"cfg": text}}, tmp_path / PUBLISHED_769)
    convert(tmp_path / PUBLISHED_769, tmp_path / "mm", "mmseg", overrides=["data.dataset=cityscapes"])
    card = write_model_card(tmp_path / "mm").read_text()
    assert "# EMANet resnet50, 5 classes (cityscapes)" in card
    assert (
        f"from `{PUBLISHED_769}`, a checkpoint of mmsegmentation, config `emanet_r50-d8_769x769_80k_cityscapes`" in card
    )
    assert "Settings read from its config text: " in card and "`align_corners=True`" in card
    assert "`slide inference 769x769 stride 513x513`" in card and "Settings assumed" not in card

    torch.save({"state_dict": mmseg_state(), "meta": {}}, tmp_path / "iter_80000.pth")
    convert(tmp_path / "iter_80000.pth", tmp_path / "bare", "mmseg")
    card = write_model_card(tmp_path / "bare").read_text()
    assert "It carried no config text." in card and "`model.align_corners=false`" in card
    assert "(voc)" not in card


def test_reference_eval_padding_follows_the_output_stride():
    sd = reference_state()
    res = convert_checkpoint({"net": sd}, "reference")
    assert (res.config.data.eval_pad_multiple, res.config.data.eval_pad_offset) == (8, 1)
    assert res.config.data.std == pytest.approx([0.229, 0.224, 0.225])
    res = convert_checkpoint({"net": sd}, "reference", overrides=["model.output_stride=16"])
    assert res.config.data.eval_pad_multiple == 16  # pad_inf pads to 1 mod settings.STRIDE
    res = convert_checkpoint({"net": sd}, "reference", overrides=["data.eval_pad_multiple=0"])
    assert res.config.data.eval_pad_multiple == 0


def test_a_setting_that_is_not_a_literal_is_named_not_guessed():
    text = (FIXTURES / "mmengine_emanet_r50-d8_4xb2-80k_cityscapes-769x769.txt").read_text()
    text = text.replace(
        "        align_corners=True,\n        channels=256,\n        dropout_ratio=0.1,\n        ema_channels",
        "        align_corners=corners,\n        channels=256,\n        dropout_ratio=0.1,\n        ema_channels",
    )
    out = parse_mmseg_meta({"cfg": text})
    assert "align_corners" not in out["model"]
    assert any("decode_head.align_corners=<not a literal: corners>" in n for n in out["notes"])
    res = convert_checkpoint({"state_dict": mmseg_state(), "meta": {"cfg": text}}, "mmseg")
    assert res.model_config.align_corners is False and "align_corners=<not a literal" in res.summary()
