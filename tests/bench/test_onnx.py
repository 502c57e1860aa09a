"""`emanet bench onnx` (emanet/bench/onnx.py) end to end on its quick case: both reports, parity figures, and
its progress as a log line on stderr."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.mark.slow
def test_quick_run_writes_both_reports(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "emanet", "bench", "onnx", "--quick", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo (1 thr.): eager fp32" in proc.stderr and "written:" in proc.stdout
    data = json.loads((tmp_path / "onnx_results_quick.json").read_text())
    (case,) = data["cases"]
    assert set(case["median_ms"]) == {"eager fp32", "eager BN-folded", "onnxruntime"}
    assert case["same_argmax_vs_eager"]["onnxruntime"] > 0.99
    assert "| demo | 1x3x176x176 | 1 | onnxruntime |" in (tmp_path / "onnx_results_quick.md").read_text()
