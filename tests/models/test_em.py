"""EM attention core and the EMA unit: maths against float64 re-computations, properties, modes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from emanet.models.em import EMAUnit, em_attention, init_bases, set_eval_stages


def reference_em(x, bases, stages, eps=1e-6):
    """A literal float64 transcription of the reference loop (permute, repeat, explicit z_bar)."""
    x = x.double()
    b, c, h, w = x.shape
    x = x.view(b, c, h * w)  # (B, C, N)
    mu = bases.double().expand(b, -1, -1)  # (B, C, K)
    for _ in range(stages):
        x_t = x.permute(0, 2, 1)  # (B, N, C)
        z = torch.softmax(torch.bmm(x_t, mu), dim=2)  # (B, N, K)
        z_bar = z / (eps + z.sum(dim=1, keepdim=True))
        mu = torch.bmm(x, z_bar)  # (B, C, K)
        mu = mu / (eps + mu.norm(dim=1, keepdim=True))
    recon = torch.bmm(mu, z.permute(0, 2, 1)).view(b, c, h, w)
    return recon, mu, z.permute(0, 2, 1).reshape(b, -1, h, w)


def make_inputs(b=2, c=16, h=5, w=7, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(b, c, h, w, generator=g)) * 2
    mu = torch.randn(1, c, k, generator=g)
    return x, mu / mu.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("per_sample_bases", [False, True])
def test_em_attention_matches_float64_reference(stages, per_sample_bases):
    x, mu = make_inputs()
    if per_sample_bases:
        mu = torch.cat([mu, mu.roll(1, dims=2)])  # (B, C, K)
    recon, bases, resp = em_attention(x, mu, stages)
    ref_recon, ref_bases, ref_resp = reference_em(x, mu, stages)
    assert recon.shape == x.shape and bases.shape == (2, 16, 4) and resp.shape == (2, 4, 5, 7)
    torch.testing.assert_close(recon.double(), ref_recon, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bases.double(), ref_bases, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resp.double(), ref_resp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_em_attention_in_either_memory_format_matches_the_reference_and_keeps_it(b, memory_format):
    x, mu = make_inputs(b=b)
    x = x.contiguous(memory_format=memory_format)
    recon, bases, resp = em_attention(x, mu, 3)
    for got, want in zip((recon, bases, resp), reference_em(x, mu, 3)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert recon.is_contiguous(memory_format=memory_format)
    xg = x.double().requires_grad_()  # the channels_last product is differentiable too
    assert torch.autograd.gradcheck(lambda t: em_attention(t, mu.double(), 2)[0], (xg,))


def test_em_attention_properties():
    x, mu = make_inputs(b=3, c=32, h=9, w=6, k=8, seed=1)
    recon, bases, resp = em_attention(x, mu, 3)
    torch.testing.assert_close(resp.sum(dim=1), torch.ones(3, 9, 6))
    torch.testing.assert_close(bases.norm(dim=1), torch.ones(3, 8))
    # each reconstructed pixel is a convex combination of unit vectors
    assert (recon.norm(dim=1) <= 1 + 1e-5).all()
    # a sample's result does not depend on the rest of its batch
    alone = em_attention(x[1:2], mu, 3)
    for got, want in zip(alone, (recon, bases, resp)):
        torch.testing.assert_close(got, want[1:2])


def test_em_attention_runs_float32_under_autocast():
    x, mu = make_inputs(c=64, h=8, w=8, k=8, seed=2)
    x = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, bases, resp = em_attention(x, mu, 3)
    assert recon.dtype == bases.dtype == resp.dtype == torch.bfloat16
    ref_recon, _, ref_resp = reference_em(x.float(), mu, 3)
    # float32 internals: only the final cast to bfloat16 rounds (rel. 2^-8); bf16 matmuls would drift more
    torch.testing.assert_close(recon.double(), ref_recon, rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(resp.double(), ref_resp, rtol=8e-3, atol=1e-3)


def test_em_attention_rejects_bad_shapes():
    x, mu = make_inputs()
    with pytest.raises(ValueError, match="bases must be"):
        em_attention(x, mu[:, :8], 1)
    with pytest.raises(ValueError, match="num_stages"):
        em_attention(x, mu, 0)


def test_em_attention_gradcheck_float64():
    x, mu = make_inputs(b=1, c=4, h=3, w=2, k=3, seed=3)
    x = x.double().requires_grad_()
    mu = mu.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: em_attention(a, b, 2)[0], (x, mu))


def test_init_bases_unit_columns():
    mu = init_bases(32, 8)
    assert mu.shape == (1, 32, 8)
    torch.testing.assert_close(mu.norm(dim=1), torch.ones(1, 8))


# ----------------------------------------------------------------------------- the unit


def unit_input(b=2, c=16, h=5, w=6, seed=0):
    return torch.relu(torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed)))


def test_unit_is_a_drop_in_block():
    unit = EMAUnit(16, num_bases=4, num_stages=2)
    x = unit_input()
    assert unit(x).shape == x.shape


@pytest.mark.parametrize("renormalize", [False, True])
def test_bases_moving_average_arithmetic(renormalize):
    torch.manual_seed(0)
    unit = EMAUnit(16, num_bases=4, num_stages=3, momentum=0.25, renormalize=renormalize)
    mu0 = unit.bases.clone()
    x = unit_input()
    with torch.no_grad():
        _, mu, _ = reference_em(unit.conv_in(x), mu0, 3)
    batch_mu = mu.mean(dim=0, keepdim=True)
    if renormalize:
        batch_mu = batch_mu / (1e-6 + batch_mu.norm(dim=1, keepdim=True))
    unit.train()(x)
    torch.testing.assert_close(unit.bases.double(), 0.75 * mu0.double() + 0.25 * batch_mu, rtol=1e-5, atol=1e-6)


def test_bases_never_change_in_eval_or_when_fixed():
    unit = EMAUnit(16, num_bases=4)
    mu0 = unit.bases.clone()
    unit.eval()(unit_input())
    assert torch.equal(unit.bases, mu0)
    fixed = EMAUnit(16, num_bases=4, bases_update="none")
    mu0 = fixed.bases.clone()
    fixed.train()(unit_input())
    assert torch.equal(fixed.bases, mu0)


def test_deferred_update_uses_the_accumulated_batch():
    torch.manual_seed(0)
    a, b = EMAUnit(16, num_bases=4), EMAUnit(16, num_bases=4)
    b.load_state_dict(a.state_dict())
    x = unit_input(b=4)
    a.train()(x)  # one batch of 4
    b.train().defer_bases_update = True
    b(x[:2])
    b(x[2:])  # two micro-batches of 2
    assert not torch.equal(b.bases, a.bases)  # nothing applied yet
    b.apply_bases_update()
    torch.testing.assert_close(b.bases, a.bases)


def test_eval_stages_are_used_only_in_eval():
    torch.manual_seed(0)
    unit = EMAUnit(16, num_bases=4, num_stages=1, eval_stages=5, bases_update="none", store_attention=True)
    x = unit_input()
    feats = unit.conv_in(x).detach()
    unit.eval()(x)
    torch.testing.assert_close(unit.last_bases, em_attention(feats, unit.bases, 5)[1])
    unit.train()(x)
    torch.testing.assert_close(unit.last_bases, em_attention(feats, unit.bases, 1)[1])
    set_eval_stages(unit, 2)
    unit.eval()(x)
    torch.testing.assert_close(unit.last_bases, em_attention(feats, unit.bases, 2)[1])


def test_store_attention_keeps_output_and_exposes_maps():
    torch.manual_seed(0)
    unit = EMAUnit(16, num_bases=4).eval()
    x = unit_input(h=5, w=7)
    plain = unit(x)
    unit.store_attention = True
    assert torch.equal(unit(x), plain)
    assert unit.last_responsibilities.shape == (2, 4, 5, 7)
    assert unit.last_bases.shape == (2, 16, 4)
    assert not unit.last_responsibilities.requires_grad


def test_default_mode_freezes_conv_in():
    unit = EMAUnit(16, num_bases=4)
    trainable = {id(p) for p in unit.parameters() if p.requires_grad}
    assert id(unit.conv_in.weight) not in trainable and id(unit.conv_in.bias) not in trainable
    x = unit_input().requires_grad_()
    unit(x).sum().backward()
    assert unit.conv_in.weight.grad is None
    assert unit.conv_out.weight.grad is not None and x.grad is not None


def test_differentiable_mode_trains_conv_in():
    unit = EMAUnit(8, num_bases=3, num_stages=2, differentiable=True).double()
    unit(unit_input(c=8).double()).sum().backward()
    assert unit.conv_in.weight.grad is not None and unit.conv_in.weight.grad.abs().sum() > 0
    unit.zero_grad()
    # gradcheck through the whole unit (BN in eval so the function is fixed)
    unit.eval()
    x = unit_input(b=1, c=8, h=3, w=2).double().requires_grad_()
    assert torch.autograd.gradcheck(unit, (x,))


def test_learned_bases_get_gradients_and_no_moving_average():
    unit = EMAUnit(8, num_bases=3, bases_update="learned")
    assert isinstance(unit.bases, torch.nn.Parameter)
    before = unit.bases.detach().clone()
    unit.train()(unit_input(c=8)).sum().backward()
    assert unit.bases.grad is not None and unit.bases.grad.abs().sum() > 0
    assert unit.conv_in.weight.grad is None  # not differentiable: conv_in still frozen
    assert torch.equal(unit.bases.detach(), before)


def test_gamma_residual_starts_as_identity():
    unit = EMAUnit(8, num_bases=3, residual="gamma")
    x = unit_input(c=8)
    assert torch.equal(unit(x), x)
    unit(x).sum().backward()
    assert unit.gamma.grad is not None and unit.gamma.grad.abs().item() > 0
    assert not hasattr(unit, "conv_out")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_bases": 0}, "num_bases"),
        ({"num_stages": 0}, "num_stages"),
        ({"bases_update": "sgd"}, "bases_update"),
        ({"residual": "add"}, "residual"),
        ({"momentum": 1.5}, "momentum"),
    ],
)
def test_unit_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMAUnit(8, **kwargs)


# ----------------------------------------------------------------------------- global batch under DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, state, xs, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        unit = EMAUnit(16, num_bases=4)
        unit.load_state_dict(state)
        unit.train()(xs[rank])
        out[rank] = unit.bases.clone()
    finally:
        torch.distributed.destroy_process_group()


def test_moving_average_uses_the_global_batch_across_processes():
    torch.manual_seed(0)
    single = EMAUnit(16, num_bases=4)
    state = {k: v.clone() for k, v in single.state_dict().items()}
    xs = [unit_input(b=1, seed=1), unit_input(b=3, seed=2)]  # unequal local batches
    single.train()(torch.cat(xs))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), state, xs, out), nprocs=2)
        ranks = [out[0], out[1]]
    assert torch.equal(ranks[0], ranks[1])
    torch.testing.assert_close(ranks[0], single.bases)


def test_a_discarded_pending_update_never_reaches_the_bases():
    unit = EMAUnit(16, num_bases=4).train()
    unit.defer_bases_update = True
    before = unit.bases.clone()
    unit(unit_input(seed=3))  # accumulates a batch estimate, applies nothing yet
    unit.discard_pending_update()
    unit.apply_bases_update()  # nothing pending: the bases stay bit for bit
    assert torch.equal(unit.bases, before)
    unit(unit_input(seed=4))
    unit.apply_bases_update()
    assert not torch.equal(unit.bases, before)
