"""The demo end to end on a tiny budget: both models train, the report and its figures are written."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from emanet.experiments.demo import demo_config, run_demo  # noqa: E402

TINY = [
    "train.iterations=2",
    "train.batch_size=2",
    "train.eval_interval=0",
    "train.log_interval=1",
    "model.backbone_width=8",
    "model.channels=16",
    "model.mid_channels=8",
    "data.num_workers=0",
    "data.options={length: 4, val_length: 6, image_size: 48, min_objects: 2, max_objects: 6, "
    "tint_strength: 0.25, noise: 0.03, hue_jitter: 0.9}",
    "data.crop_size=48",
]


def test_demo_config_is_valid_and_cpu_sized():
    cfg = demo_config()
    assert cfg.data.dataset == "synthetic" and cfg.train.device == "cpu" and cfg.model.backbone == "resnet10"


def test_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, TINY, progress=False)
    for name in ("report.md", "report.html", "curves.png", "samples.png", "responsibilities.png", "summary.json"):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    assert "EMANet" in text and "FCN" in text and "bfloat16" in text and "![training curves](curves.png)" in text
    assert set(summary["mIoU"]) == {"EMANet", "FCN"} and summary["report"] == out / "report.md"
    assert "EMANet" in summary["summary"] and "**" not in summary["summary"]
    assert json.loads((out / "summary.json").read_text())["emanet_bf16_mIoU"] >= 0
