"""model.differentiable=last: back-propagation through the last EM stage only (Hamburger's one-step gradient)."""

from __future__ import annotations

import pytest
import torch

from emanet import EMAUnit, ModelConfig, build_model, em_attention
from emanet.config import load_config
from emanet.errors import ConfigError


def reference_em(x, bases, stages, grad_stages, eps=1e-6):
    """An independent EM loop in float64: autograd is on only for the last ``grad_stages`` stages."""
    b, c, h, w = x.shape
    feats = x.reshape(b, c, h * w)  # (B, C, N)
    mu = bases.expand(b, -1, -1)  # (B, C, K)
    for stage in range(stages):
        with torch.set_grad_enabled(stage >= stages - grad_stages):
            z = torch.softmax(torch.einsum("bcn,bck->bnk", feats, mu), dim=2)  # (B, N, K)
            z_bar = z / (eps + z.sum(dim=1, keepdim=True))
            mu = torch.einsum("bcn,bnk->bck", feats, z_bar)
            mu = mu / (eps + mu.norm(dim=1, keepdim=True))
    return torch.einsum("bck,bnk->bcn", mu, z).reshape(b, c, h, w)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)).requires_grad_()
    bases = torch.nn.functional.normalize(torch.randn(1, 6, 3, generator=g, dtype=torch.float64), dim=1)
    weight = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)  # a loss that weighs every output
    return x, bases, weight


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_last_stage_gradient_matches_an_independent_one_step_loop(stages):
    x, bases, weight = _inputs()
    recon, _, _ = em_attention(x, bases, stages, last_stage_grad=True)
    (grad,) = torch.autograd.grad((recon * weight).sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    ref = reference_em(x_ref, bases, stages, grad_stages=1)
    (grad_ref,) = torch.autograd.grad((ref * weight).sum(), x_ref)
    torch.testing.assert_close(recon, ref, rtol=1e-10, atol=1e-12)  # the forward is unchanged
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-10)


def test_last_stage_gradient_differs_from_the_full_unroll_beyond_one_stage():
    x, bases, weight = _inputs(1)
    full = torch.autograd.grad((em_attention(x, bases, 3)[0] * weight).sum(), x)[0]
    last = torch.autograd.grad((em_attention(x, bases, 3, last_stage_grad=True)[0] * weight).sum(), x)[0]
    ref_full = torch.autograd.grad((reference_em(x, bases, 3, grad_stages=3) * weight).sum(), x)[0]
    torch.testing.assert_close(full, ref_full, rtol=1e-8, atol=1e-10)
    assert (full - last).abs().max() > 1e-3 * full.abs().max()
    one = torch.autograd.grad((em_attention(x, bases, 1)[0] * weight).sum(), x)[0]
    one_last = torch.autograd.grad((em_attention(x, bases, 1, last_stage_grad=True)[0] * weight).sum(), x)[0]
    torch.testing.assert_close(one, one_last)  # T=1: the last stage is every stage


def test_unit_with_last_trains_conv_in_and_refuses_learned_bases():
    torch.manual_seed(0)
    unit = EMAUnit(8, num_bases=3, num_stages=3, differentiable="last").double()
    assert unit.conv_in.weight.requires_grad
    unit(torch.relu(torch.randn(2, 8, 5, 6, dtype=torch.float64))).sum().backward()
    assert unit.conv_in.weight.grad is not None and unit.conv_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="learned bases"):
        EMAUnit(8, num_bases=3, differentiable="last", bases_update="learned")
    with pytest.raises(ValueError, match="false, true or 'last'"):
        EMAUnit(8, num_bases=3, differentiable="first")


def test_config_override_builds_a_one_step_model():
    cfg = load_config(None, ["model.differentiable=last"])
    assert cfg.model.differentiable == "last"
    assert load_config(None, ["model.differentiable=true"]).model.differentiable is True
    with pytest.raises(ConfigError, match="model.differentiable"):
        load_config(None, ["model.differentiable=first"])
    with pytest.raises(ConfigError, match="model.differentiable=last leaves learned bases"):
        ModelConfig(differentiable="last", bases_update="learned")
    model = build_model(
        ModelConfig(
            backbone="resnet10",
            stem="standard",
            backbone_width=8,
            channels=8,
            mid_channels=8,
            num_bases=2,
            num_classes=3,
            differentiable="last",
        )
    )
    assert model.head.context.differentiable == "last"
