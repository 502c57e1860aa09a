"""`emanet bench gpu` (emanet/bench/gpu.py): its CPU dry run (tiny shapes) goes through every case and writes both
reports, so the code cannot rot while no GPU is at hand; the budget skips cases visibly; no GPU is a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the dry run must not depend on a GPU being there
    return subprocess.run(
        [sys.executable, "-m", "emanet", "bench", "gpu", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_dry_run_measures_every_case_and_writes_both_reports(tmp_path):
    proc = run_script("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert f"written: {tmp_path / 'gpu_results.md'}" in proc.stdout
    assert "matmul TFLOP/s" in proc.stderr  # the progress lines are log lines
    result = json.loads((tmp_path / "gpu_results.json").read_text())
    md = (tmp_path / "gpu_results.md").read_text()
    assert result["dry_run"] and "DRY RUN on the CPU" in md
    assert set(result["machine"]) >= {"torch", "python", "device", "date"}
    assert result["matmul_tflops"]["fp32"] > 0 and result["matmul_tflops"]["bf16"] > 0
    # (a) training: every precision x layout, eager, and a compiled case; nothing skipped
    train = result["train"]
    assert not [row for row in train if "skipped" in row]
    assert {(r["precision"], r["channels_last"]) for r in train if not r["compiled"]} == {
        (p, cl) for p in ("fp32", "bf16", "fp16") for cl in (True, False)
    }
    assert any(r["compiled"] for r in train)
    assert all(r["images_per_s"] > 0 and r["step_s"] > 0 for r in train)
    # (b) inference: eager fp32 and the prepared model in three precisions; (c) EM vs einsum vs non-local
    assert [(r["variant"], r["precision"]) for r in result["inference"]] == [
        ("eager", "fp32"),
        ("prepared", "fp32"),
        ("prepared", "bf16"),
        ("prepared", "fp16"),
    ]
    assert {r["variant"] for r in result["em"]} == {"em_attention", "einsum", "nonlocal"}
    assert all(r["gflop"] > 0 and r["pct_of_matmul"] > 0 for r in result["em"])
    for heading in ("## (a) Training", "## (b) Inference", "## (c) EM attention"):
        assert heading in md
    assert md.count("| EMANet-") == len(train) + len(result["inference"])


def test_einsum_transcription_matches_em_attention():
    from emanet.bench import gpu
    from emanet.models.em import em_attention

    x = torch.relu(torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(0)))
    bases = torch.nn.functional.normalize(torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    torch.testing.assert_close(gpu.einsum_em(x, bases, 3), em_attention(x, bases, 3)[0], rtol=1e-5, atol=1e-6)


def test_a_spent_budget_skips_cases_and_says_so(tmp_path):
    proc = run_script("--dry-run", "--out", str(tmp_path), "--budget-s", "0")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu_results.json").read_text())
    rows = result["train"] + result["inference"] + result["em"]
    assert rows and all(row.get("skipped") == "budget" for row in rows)
    assert "skipped (budget)" in (tmp_path / "gpu_results.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_the_real_run_is_a_clear_error(tmp_path):
    proc = run_script("--out", str(tmp_path))
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "gpu_results.json").exists()
