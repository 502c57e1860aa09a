"""emanet.bench.em: table (a)'s cases run and measure what they name."""

from __future__ import annotations

import torch

from emanet.bench.em import GROUPS, _make, bench_em


def test_every_case_runs_and_the_channels_last_case_feeds_em_attention_channels_last():
    rows = bench_em(sizes=(9,), budget_s=0.01, memory=False)
    assert {(r["variant"], r["mode"]) for r in rows} == {case for group in GROUPS for case in group}
    assert all(r["median_ms"] > 0 and r["gflop"] > 0 for r in rows)
    nchw, nhwc = _make("em_attention", 9, "inference")(), _make("em_attention_nhwc", 9, "inference")()
    assert not nchw[0].is_contiguous(memory_format=torch.channels_last)
    assert nhwc[0].is_contiguous(memory_format=torch.channels_last) and not nhwc[0].is_contiguous()
    torch.testing.assert_close(nhwc[0], nchw[0])
