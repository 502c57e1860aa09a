"""Evaluation outputs: the confusion matrix in eval.json and `emanet eval --plot`'s two figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from emanet.errors import install_hint
from emanet.experiments.plots import normalise_rows

TINY = [
    "--config",
    "synthetic_toy",
    "train.iterations=2",
    "train.batch_size=2",
    "train.checkpoint_interval=2",
    "data.options.length=4",
    "data.options.val_length=3",
    "data.options.image_size=48",
    "data.options.min_objects=2",
    "data.options.max_objects=4",
    "data.crop_size=48",
]


def test_normalise_rows_against_hand_counts():
    m = [[3, 1, 0], [0, 0, 0], [2, 2, 4]]
    expected = np.array([[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]])  # an empty row stays 0
    np.testing.assert_allclose(normalise_rows(m), expected)
    with pytest.raises(ValueError, match="square"):
        normalise_rows([[1, 2, 3]])


def test_figures_are_written_and_names_are_checked(tmp_path):
    pytest.importorskip("matplotlib")
    from emanet.experiments.plots import (
        plot_class_iou,
        plot_class_iou_groups,
        plot_confusion,
        plot_stage_grid,
        plot_variants,
    )

    names = ["background", "cat", "dog"]
    paths = [
        plot_confusion([[5, 1, 0], [0, 2, 2], [1, 0, 3]], names, tmp_path / "c.png"),
        plot_class_iou([0.8, None, 0.4], names, tmp_path / "i.png"),
        plot_stage_grid([[50.0, 52.0], [51.0, 55.5]], ["1", "2"], [1, 2], tmp_path / "g.png"),
        plot_variants([40.0, 45.0], ["ema", "none"], tmp_path / "v.png"),
        plot_class_iou_groups(
            [[90.0, float("nan"), 30.0], [91.0, 20.0, 35.0]], ["ref", "mmseg"], names, tmp_path / "h.png"
        ),
    ]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) > 100
    with pytest.raises(ValueError, match="2 class names for a 3x3"):
        plot_confusion(np.eye(3), names[:2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="3 class names for 2 IoU"):
        plot_class_iou([0.1, 0.2], names, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\(1, 3\) for 2 variants x 3 classes"):
        plot_class_iou_groups([[1.0, 2.0, 3.0]], ["ref", "mmseg"], names, tmp_path / "x.png")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    r = subprocess.run(
        [sys.executable, "-m", "emanet", "train", *TINY, f"train.out_dir={root / 'run'}", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return root / "run"


def test_eval_json_holds_the_confusion_matrix_and_plot_writes_figures(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "ev" / "val.json"
    out.parent.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "emanet", "eval", str(tiny_run), "--plot", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    m = np.array(res["confusion_matrix"])
    assert m.shape == (5, 5) and m.dtype.kind == "i"
    assert m.sum() == 3 * 48 * 48  # every pixel of the 3 validation scenes is labelled
    # the scores follow from the counts (an independent recomputation)
    tp, union = np.diag(m), m.sum(0) + m.sum(1) - np.diag(m)
    iou = [None if u == 0 else t / u for t, u in zip(tp, union)]
    for ours, theirs in zip(res["IoU"], iou):
        assert (ours is None and theirs is None) or abs(ours - theirs) < 1e-12
    assert abs(res["aAcc"] - tp.sum() / m.sum()) < 1e-12
    for name in ("val_confusion.png", "val_iou.png"):
        with Image.open(out.parent / name) as im:
            assert im.format == "PNG"
    # the run's own eval.json (written by training) holds the matrix too
    assert np.array(json.loads((tiny_run / "eval.json").read_text())["confusion_matrix"]).sum() == m.sum()


def test_plot_without_matplotlib_is_a_message_before_any_work(tiny_run, tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('blocked for this test')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(
        [sys.executable, "-m", "emanet", "eval", str(tiny_run), "--plot", "--out", str(tmp_path / "e.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2 and install_hint("report") in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "e.json").exists()
