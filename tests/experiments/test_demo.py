"""The demo end to end on a tiny budget: both models train, the report and its figures are written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

import emanet.experiments.report  # noqa: E402
from emanet.experiments.demo import choose_rows, demo_config, run_demo  # noqa: E402

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


def test_choose_rows_takes_each_models_median_and_worst_scene():
    rows = choose_rows({"EMANet": [0.9, 0.1, 0.8, 0.7, 0.95], "FCN": [0.5, 0.6, 0.2, 0.55, 0.3]})
    # EMANet sorted: 1, 3, 2, 0, 4 -> median 2; FCN sorted: 2, 4, 0, 3, 1 -> median 0
    assert rows == [(2, "typical (median) EMANet + worst FCN"), (0, "typical (median) FCN"), (1, "worst EMANet")]


def test_demo_writes_the_report(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    figures, real_save = {}, emanet.experiments.report._save

    def save(fig, path):
        figures[Path(path).name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(emanet.experiments.report, "_save", save)
    summary = run_demo(out, TINY, progress=False)
    for name in ("report.md", "report.html", "curves.png", "samples.png", "responsibilities.png", "summary.json"):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    assert "EMANet" in text and "FCN" in text and "bfloat16" in text and "![training curves](curves.png)" in text
    assert set(summary["mIoU"]) == {"EMANet", "FCN"} and summary["report"] == out / "report.md"
    assert "EMANet" in summary["summary"] and "**" not in summary["summary"]
    assert json.loads((out / "summary.json").read_text())["emanet_bf16_mIoU"] >= 0

    # the sample rows: each model's typical and worst scene, captioned with both models' mIoU on that scene
    saved = json.loads((out / "summary.json").read_text())
    rows, scene_miou = saved["sample_rows"], saved["scene_mIoU"]
    assert len(scene_miou["EMANet"]) == len(scene_miou["FCN"]) == 6  # every held-out scene
    assert [r["scene"] for r in rows] == [i for i, _ in choose_rows(scene_miou)]
    labels = " + ".join(r["why"] for r in rows)
    assert all(f"{kind} {m}" in labels for kind in ("typical (median)", "worst") for m in ("EMANet", "FCN"))
    texts = {t for ax in figures["samples.png"].axes for t in (ax.get_title(), *(x.get_text() for x in ax.texts))}
    for r in rows:
        assert f"{r['why']} (scene {r['scene']})" in texts
        for m in ("EMANet", "FCN"):
            assert f"{m}: {100 * scene_miou[m][r['scene']]:.1f} mIoU" in texts
            assert f"{100 * scene_miou[m][r['scene']]:.2f}" in text  # the report's table of the rows
    assert "| row | why shown | scene | EMANet mIoU | FCN mIoU |" in text
    # the EMA unit's settings and why the demo lets gradients through EM
    settings = text.split("## EMANet settings")[1].split("## ")[0]
    assert "| bases K (`model.num_bases`) | 2 |" in settings and "| EM stages T (`model.num_stages`) | 3 |" in settings
    assert "| gradient through EM (`model.differentiable`) | true |" in settings
    assert "`model.differentiable=false`" in settings and "momentum" in settings
    # a colour bar on the responsibilities; the mIoU panel is labelled bars, not a lone point per model
    assert sum("responsibility" in ax.get_ylabel() for ax in figures["responsibilities.png"].axes) == 1
    miou_panel = figures["curves.png"].axes[1]
    assert len(miou_panel.patches) == 2 and not miou_panel.get_lines()
    assert re.search(r"one evaluation at iteration 2", miou_panel.get_title())


def test_predictions_text_counts_misread_scenes_and_names_misread_worst_rows():
    from emanet.experiments.demo import _predictions_text

    per_scene = {
        "mIoU": {"EMANet": [0.9, 0.2, 0.8], "FCN": [0.5, 0.6, 0.1]},
        "wrong_class": {"EMANet": [False, True, False], "FCN": [False, False, False]},
    }
    text = _predictions_text({"EMANet": {}, "FCN": {}}, choose_rows(per_scene["mIoU"]), per_scene)
    assert "get a wrong class (of 3): EMANet 1, FCN 0. EMANet's worst scene is such a scene." in text
    assert (
        "| 3 | worst EMANet | 1 | 20.00 | 60.00 |" in text and "Median per-scene mIoU: EMANet 80.00, FCN 50.00" in text
    )
