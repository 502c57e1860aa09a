"""Heads: shapes, forward and backward of every head and context module, the non-local maths."""

from __future__ import annotations

import pytest
import torch

from emanet.models.em import EMAUnit
from emanet.models.heads import FCNAuxHead, NonLocal2d, SegHead


def feats(b=2, c=32, h=5, w=7, seed=0):
    return torch.relu(torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed)))


CONTEXTS = {
    "fcn": lambda: None,
    "nonlocal": lambda: NonLocal2d(16),
    "emanet": lambda: EMAUnit(16, num_bases=4, num_stages=2),
}


@pytest.mark.parametrize("layout", ["reference", "mmseg"])
@pytest.mark.parametrize("context", sorted(CONTEXTS))
def test_head_forward_backward(layout, context):
    torch.manual_seed(0)
    head = SegHead(32, 5, context=CONTEXTS[context](), channels=16, mid_channels=8, layout=layout).train()
    x = feats().requires_grad_()
    out = head(x)
    assert out.shape == (2, 5, 5, 7)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
    if layout == "mmseg":
        assert head.cat.conv.in_channels == 32 + 8
    else:
        assert head.cat is None


def test_head_rejects_unknown_layout():
    with pytest.raises(ValueError, match="layout"):
        SegHead(32, 5, layout="deeplab")


def test_nonlocal_matches_explicit_formula():
    torch.manual_seed(0)
    block = NonLocal2d(8).eval().double()
    torch.nn.init.normal_(block.bn.weight)  # make the branch visible (it starts at zero)
    x = feats(b=1, c=8, h=3, w=4).double()
    n = 12
    t = block.theta(x).view(1, 4, n)[0]  # (C', N)
    p = block.phi(x).view(1, 4, n)[0]
    g = block.g(x).view(1, 4, n)[0]
    attn = torch.softmax(t.T @ p, dim=1)  # rows: query pixel, columns: key pixel
    y = (attn @ g.T).T.reshape(1, 4, 3, 4)
    want = x + block.bn(block.out(y))
    torch.testing.assert_close(block(x), want)


def test_nonlocal_starts_as_identity():
    x = feats(c=8)
    assert torch.equal(NonLocal2d(8).eval()(x), x)


def test_aux_head_shapes_and_grad():
    head = FCNAuxHead(32, 5, channels=8)
    x = feats().requires_grad_()
    out = head(x)
    assert out.shape == (2, 5, 5, 7)
    out.sum().backward()
    assert head.conv.conv.weight.grad is not None
