"""FLOP and parameter counts: the paper's Table 1 and exact hand-computed increments."""

from __future__ import annotations

import dataclasses

import pytest

from emanet.flops import count_config, table1
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def rows():
    return {r["part"]: r for r in table1((513, 513))}


def test_backbone_within_3_percent_of_paper(rows):
    r = rows["ResNet-101 backbone"]
    assert abs(r["gmacs"] / r["paper_gmacs"] - 1) < 0.03
    assert abs(r["mparams"] / r["paper_mparams"] - 1) < 0.03


@pytest.mark.parametrize("part", ["EMANet(512) increment", "EMANet(256) increment"])
def test_increments_within_5_percent_of_paper(rows, part):
    r = rows[part]
    assert abs(r["gmacs"] / r["paper_gmacs"] - 1) < 0.05
    assert abs(r["mparams"] / r["paper_mparams"] - 1) < 0.05


TINY = tiny_model(backbone_width=64)


def test_ema_increment_matches_hand_count():
    size = (65, 65)  # OS8 -> 9x9 features
    n, c, k, t = 9 * 9, 16, 4, 3
    ema = count_config(TINY, size)
    fcn = count_config(dataclasses.replace(TINY, arch="fcn"), size)
    # two 1x1 convs + T stages of (E-step + M-step) + the reconstruction, each N*C*K
    assert ema.increment.macs - fcn.increment.macs == 2 * n * c * c + (2 * t + 1) * n * c * k
    assert ema.increment.params - fcn.increment.params == (c * c + c) + c * c + 2 * c
    assert ema.backbone == fcn.backbone and ema.rest == fcn.rest


def test_nonlocal_increment_matches_hand_count():
    n, c, ci = 9 * 9, 16, 8
    nl = count_config(dataclasses.replace(TINY, arch="nonlocal"), (65, 65))
    fcn = count_config(dataclasses.replace(TINY, arch="fcn"), (65, 65))
    assert nl.increment.macs - fcn.increment.macs == 3 * n * c * ci + 2 * n * n * ci + n * ci * c


def test_aux_head_counted_in_rest():
    plain = count_config(TINY, (65, 65))
    aux = count_config(dataclasses.replace(TINY, aux=True), (65, 65))
    # 3x3 conv 256->256 on layer3 (9x9 at OS8) + 1x1 to classes
    assert aux.rest.macs - plain.rest.macs == 81 * (9 * 256 * 256 + 256 * 3)
