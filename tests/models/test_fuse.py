"""BatchNorm folding and activation fusion: same outputs, no BatchNorm left, on every backbone stem and head."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from emanet.models import fuse
from emanet.models.emanet import ARCHS, ModelConfig, build_model
from emanet.models.fuse import fold_batchnorm, fuse_activations, prepare_for_inference

TINY = dict(num_classes=3, channels=16, mid_channels=8, num_bases=4, output_stride=8, multi_grid=False)


def randomize_bn(model: nn.Module, seed: int = 0) -> int:
    """Random running stats and affine params, so folding is far from the identity. Returns the BN count."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                n += 1
    return n


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    outs = [model(x)]
    if getattr(model, "aux_head", None) is not None:  # eval mode skips the aux head: call it directly
        outs.append(model.aux_head(model.backbone(x)[-2]))
    return outs


def check_fold(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.eval()
    n_bn = randomize_bn(model)
    with torch.no_grad():
        before = outputs(model, x)
        assert fold_batchnorm(model) == n_bn
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        after = outputs(model, x)
    for a, b in zip(before, after):
        rel = (a - b).abs().max() / a.abs().max()
        assert rel < 1e-4, f"folded output differs by {rel:.2e} relative"
    return model


def images(h=33, w=41):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("stem", ["standard", "deep", "v1c"])
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_fold_emanet_every_backbone_and_stem(backbone, stem):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="emanet", backbone=backbone, stem=stem, **TINY))
    check_fold(model, images())
    unit = model.head.context
    assert isinstance(unit.bn_out, nn.Identity) and unit.conv_out.bias is not None
    if stem == "deep":  # bn1 folded into the last conv of the conv1 Sequential
        assert isinstance(model.backbone.bn1, nn.Identity) and model.backbone.conv1[-1].bias is not None


@pytest.mark.parametrize(
    "cfg",
    [
        dict(arch="nonlocal", backbone="resnet18"),
        dict(arch="emanet", backbone="resnet18", head_layout="mmseg", aux=True),
        dict(arch="fcn", backbone="resnet18", stem="deep", aux=True),
    ],
    ids=["nonlocal", "mmseg-aux", "fcn-aux"],
)
def test_fold_heads(cfg):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**cfg, **TINY))
    check_fold(model, images())
    if cfg["arch"] == "nonlocal":
        assert isinstance(model.head.context.bn, nn.Identity)


def test_fold_matches_in_float64_tightly():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", stem="deep", **TINY)).double().eval()
    randomize_bn(model)
    x = images(17, 19).double()
    with torch.no_grad():
        before = model(x)
        fold_batchnorm(model)
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)


def test_training_mode_is_refused_and_second_call_is_a_no_op():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", **TINY))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model)
    model.eval()
    assert fold_batchnorm(model) > 0
    assert fold_batchnorm(model) == 0


def test_only_conv_then_bn_is_folded():
    torch.manual_seed(0)
    shared = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3, padding=1),
            relu=nn.ReLU(),
            bn=nn.BatchNorm2d(4),  # after a ReLU: not affine in the conv's output
            c2=nn.Conv2d(4, 4, 1, bias=False),
            bn2=nn.BatchNorm2d(4),  # folded
            c3=shared,
            bn3=nn.BatchNorm2d(4),  # the conv is used again below: folding would rescale both uses
            c4=shared,
            bn4=nn.BatchNorm2d(4, track_running_stats=False),  # batch statistics even in eval
        )
    ).eval()
    randomize_bn(model)
    x = images()
    with torch.no_grad():
        before = model(x)
        assert fold_batchnorm(model) == 1
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert isinstance(model.bn2, nn.Identity) and model.c2.bias is not None
    assert [type(m) for m in (model.bn, model.bn3, model.bn4)] == [nn.BatchNorm2d] * 3


def test_prepare_for_inference():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", stem="v1c", **TINY))
    model.eval()
    randomize_bn(model)
    x = images()
    with torch.no_grad():
        before = model(x)
    model.train()
    assert prepare_for_inference(model) is model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        after = model(x.to(memory_format=torch.channels_last))
    assert (after - before).abs().max() / before.abs().max() < 1e-4


# ----------------------------------------------------------------------------- the prepared model


@pytest.mark.parametrize("layout", ["reference", "mmseg"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prepared_model_equals_the_eager_one_for_every_arch_and_head_layout(arch, layout):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, backbone="resnet18", stem="deep", head_layout=layout, aux=True, **TINY)
    model = build_model(cfg).eval()
    randomize_bn(model)
    x = images(33, 41)
    with torch.no_grad():
        before = model(x)
        fast = prepare_for_inference(copy.deepcopy(model))
        after = fast(x)  # NCHW in: the pre-hook hands the network channels_last
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the copy was prepared, not the original
    assert after.shape == before.shape
    rel = ((after - before).abs().max() / before.abs().max()).item()
    assert rel < 1e-4, f"prepared {arch}/{layout} differs from eager by {rel:.2e} relative"
    assert torch.equal(after.argmax(1), before.argmax(1))


def test_prepare_twice_registers_one_input_hook():
    torch.manual_seed(0)
    model = prepare_for_inference(prepare_for_inference(build_model(ModelConfig(backbone="resnet18", **TINY))))
    assert len(model._forward_pre_hooks) == 1
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(images())
    assert seen[0].is_contiguous(memory_format=torch.channels_last)


def test_prepared_model_under_bf16_autocast_keeps_the_em_in_float32(monkeypatch):
    import emanet.models.em

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", **TINY)).eval()
    randomize_bn(model)
    fast = prepare_for_inference(copy.deepcopy(model))
    dtypes, real = [], emanet.models.em.em_attention

    def spy(x, bases, *args):
        dtypes.append((x.dtype, bases.dtype))
        return real(x, bases, *args)

    monkeypatch.setattr(emanet.models.em, "em_attention", spy)
    x = images(33, 41)
    with torch.no_grad():
        want = model(x)
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast(x)
    assert dtypes == [(torch.float32, torch.float32)]
    assert got.dtype == torch.bfloat16  # the convs did run in bf16
    assert (got.float() - want).abs().max() / want.abs().max() < 5e-2


# ----------------------------------------------------------------------------- activation fusion


def dispatched_ops(fn) -> tuple[torch.Tensor, list[tuple[str, torch.dtype | None]]]:
    """Run ``fn``; the (op, first tensor argument's dtype) of every op it dispatched, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            ops.append((str(func.overloadpacket), None if first is None else first.dtype))
            return func(*args, **(kwargs or {}))

    with Record():
        out = fn()
    return out, ops


def count(ops, *names) -> int:
    return sum(op in names for op, _ in ops)


FUSED_OP = "mkldnn._convolution_pointwise"
CONVS = ("aten.conv2d", "aten.convolution")
RELUS = ("aten.relu", "aten.relu_", "aten.clamp_min", "aten.clamp_min_")


def plain_and_fused(backbone: str, stem: str) -> tuple[nn.Module, nn.Module]:
    """A tiny random-BN model prepared twice: folded only, and folded + fused."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, stem=stem, **TINY)).eval()
    randomize_bn(model)
    return prepare_for_inference(copy.deepcopy(model), fuse=False), prepare_for_inference(copy.deepcopy(model))


@pytest.mark.parametrize("stem", ["standard", "deep", "v1c"])
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_fused_model_equals_the_folded_one_and_runs_conv_relu_add_as_one_op(backbone, stem):
    plain, fused = plain_and_fused(backbone, stem)
    blocks = [m for m in plain.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    assert sum(type(m).__name__ in ("FusedBasicBlock", "FusedBottleneck") for m in fused.modules()) == len(blocks)
    assert plain.state_dict().keys() == fused.state_dict().keys()  # the subclasses keep every child
    x = images(33, 41)
    with torch.inference_mode():
        want, plain_ops = dispatched_ops(lambda: plain(x))
        got, fused_ops = dispatched_ops(lambda: fused(x))
    # relative to the largest logit: random BatchNorm statistics blow these logits up to ~5e3, and with one
    # thread oneDNN's fused kernel rounds differently from aten's conv (2e-6 relative, measured)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-5, f"fused differs from folded by {rel:.2e} relative"
    assert torch.equal(got.argmax(1), want.argmax(1))
    n_fused = count(fused_ops, FUSED_OP)
    # every ReLU in a block (2 per BasicBlock, 3 per Bottleneck) and every residual add went into a conv
    relus_per_block = 3 if backbone == "resnet50" else 2
    assert n_fused >= relus_per_block * len(blocks)
    assert count(plain_ops, *RELUS) - count(fused_ops, *RELUS) == n_fused
    assert count(plain_ops, "aten.add", "aten.add_") - count(fused_ops, "aten.add", "aten.add_") == len(blocks)
    assert count(plain_ops, *CONVS) - count(fused_ops, *CONVS) == n_fused


def test_fusion_leaves_autograd_tracing_and_unfolded_models_to_the_plain_ops():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet50", stem="deep", **TINY)).eval()
    randomize_bn(model)
    assert fuse_activations(copy.deepcopy(model)) == 0  # BatchNorm not folded: nothing matches
    plain = prepare_for_inference(copy.deepcopy(model), fuse=False)
    fused = prepare_for_inference(copy.deepcopy(model))
    x = images(17, 19).requires_grad_()
    got, ops = dispatched_ops(lambda: fused(x))  # autograd on: the fused op has no backward
    assert count(ops, FUSED_OP) == 0
    got.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        got, want = fused(x), plain(x)  # the fused ops: relative to the largest logit, as above
        assert (got - want).abs().max() / want.abs().max() < 1e-5
        graph = str(torch.jit.trace(fused, x.detach(), check_trace=False).inlined_graph)
    assert "_convolution_pointwise" not in graph and "aten::relu" in graph  # traced (ONNX too): the plain ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_ops_run_in_the_autocast_dtype_where_this_cpu_fuses_it_and_stay_close_to_the_plain_model(dtype):
    # whatever this CPU supports: fused in the autocast dtype where oneDNN can, plain ops where it cannot
    plain, fused = plain_and_fused("resnet50", "v1c")
    x = images(33, 41)
    with torch.inference_mode():
        want = plain(x)
        with torch.autocast("cpu", dtype=dtype):
            got, ops = dispatched_ops(lambda: fused(x))
    dtypes = {d for op, d in ops if op == FUSED_OP}
    assert dtypes == ({dtype} if fuse.fused_dtype_supported(dtype) else set())
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() / want.abs().max() < 5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_dtypes_this_cpu_cannot_fuse_run_the_plain_ops(monkeypatch, dtype):
    # oneDNN's fused conv refuses float16 on CPUs without avx512_fp16/avx_ne_convert (and bfloat16 without
    # its instructions): the fused blocks then leave the forward to the plain ops, which autocast handles
    plain, fused = plain_and_fused("resnet18", "deep")
    x = images(17, 19)
    monkeypatch.setattr(fuse, "fused_dtype_supported", lambda d: d == torch.float32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        want = plain(x)
        got, ops = dispatched_ops(lambda: fused(x))
    assert count(ops, FUSED_OP) == 0 and count(ops, *CONVS) > 0
    torch.testing.assert_close(got, want)


def test_fused_dtype_support_follows_onednn():
    assert fuse.fused_dtype_supported(torch.float32)
    assert fuse.fused_dtype_supported(torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert fuse.fused_dtype_supported(torch.float16) == torch.ops.mkldnn._is_mkldnn_fp16_supported()
    assert not fuse.fused_dtype_supported(torch.float64)


# ----------------------------------------------------------------------------- precision against float64


def calibrated(arch: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A ResNet-50-depth model whose BatchNorm statistics come from two training-mode batches (cumulative
    averages), as a trained model's do, and a test batch: (model in eval mode, images)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, backbone="resnet50", backbone_width=16, stem="deep", **{**TINY, "channels": 32})
    model = build_model(cfg)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 49, 49, generator=g))
    return model.eval(), torch.randn(2, 3, 49, 55, generator=g)


def errors_vs_float64(model: nn.Module, x: torch.Tensor, variants: dict) -> dict[str, tuple[float, float]]:
    """(mean absolute logit difference, largest probability difference) of each variant against float64."""
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        out = {}
        for name, make in variants.items():
            got = make(copy.deepcopy(model))(x).double()
            out[name] = ((got - ref).abs().mean().item(), (got.softmax(1) - ref.softmax(1)).abs().max().item())
    return out


STAGES = {
    "eager": lambda m: m,
    "fold": lambda m: prepare_for_inference(m, channels_last=False, fuse=False),
    "fold+fuse": lambda m: prepare_for_inference(m, channels_last=False),
    "prepared": prepare_for_inference,  # fold + fuse + channels_last, what Predictor runs
}


@pytest.mark.parametrize("seed", [0, 1])
def test_each_preparation_stage_is_as_close_to_float64_as_the_eager_model(seed):
    # Folding (in float64) and the fused ReLU/add add no error of their own; channels_last convolutions
    # (oneDNN's brgemm kernels) measured 1.3-1.7x the eager error on EMANet-R50: the bound is 2x.
    errs = errors_vs_float64(*calibrated("fcn", seed), STAGES)
    mean0, max0 = errs["eager"]
    for name, (mean, largest) in errs.items():
        assert mean <= 2 * mean0, f"{name}: mean logit error {mean:.2e} vs eager {mean0:.2e}"
        assert largest <= 2 * max0, f"{name}: largest probability error {largest:.2e} vs eager {max0:.2e}"


def test_prepared_emanet_is_as_close_to_float64_as_the_eager_one_on_average():
    # EM attention amplifies float32 rounding (nearly one-hot E-step): the largest probability difference is
    # chaotic, the mean logit difference is the stable measure
    errs = errors_vs_float64(*calibrated("emanet"), {"eager": STAGES["eager"], "prepared": STAGES["prepared"]})
    assert errs["prepared"][0] <= 2 * errs["eager"][0], errs
