"""`emanet study iterations|bases` at a tiny scale: the grid, the outputs, resuming, existing runs, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import emanet.experiments.study
from emanet.experiments.study import BASES_VARIANTS, plan, run_study

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "train.iterations=2",
    "train.batch_size=2",
    "train.checkpoint_interval=2",
    "data.options.length=4",
    "data.options.val_length=2",
    "data.options.image_size=32",
    "data.options.min_objects=1",
    "data.options.max_objects=2",
    "data.options.min_size=4",
    "data.options.max_size=6",
    "data.crop_size=32",
    "model.channels=16",
    "model.mid_channels=8",
    "model.backbone_width=8",
]


def test_plan_names_every_variant_and_refuses_bad_values():
    assert [v.name for v in plan("iterations", train_stages=[1, 3], eval_stages=[2])] == ["T1", "T3"]
    assert plan("iterations", train_stages=[3], eval_stages=[1, 5])[0].overrides == ["model.num_stages=3"]
    bases = plan("bases")
    assert [v.name for v in bases] == list(BASES_VARIANTS) and "ema_grad_last" in BASES_VARIANTS
    assert "model.differentiable=last" in BASES_VARIANTS["ema_grad_last"]
    with pytest.raises(ValueError, match=">= 1"):
        plan("iterations", train_stages=[0], eval_stages=[1])
    with pytest.raises(ValueError, match="unknown bases variant.*emma"):
        plan("bases", variants=["emma"])
    with pytest.raises(ValueError, match="unknown study"):
        plan("grid")


def test_iterations_study_writes_the_grid_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    out = tmp_path / "study"
    args = dict(config="synthetic_toy", overrides=TINY, train_stages=[1, 2], eval_stages=[1, 3], progress=False)
    real_evaluate, real_train = emanet.experiments.study.evaluate, emanet.experiments.study.train
    calls = {"eval": [], "train": 0}

    def evaluate(model, dataset, cfg, device, **kw):
        if cfg.eval.eval_stages is not None:  # a study cell
            if calls.get("interrupt") and cfg.model.num_stages == 2 and cfg.eval.eval_stages == 3:
                raise KeyboardInterrupt  # the study is stopped here
            calls["eval"].append((cfg.model.num_stages, cfg.eval.eval_stages))
        return real_evaluate(model, dataset, cfg, device, **kw)

    def train(cfg, **kw):
        calls["train"] += 1
        return real_train(cfg, **kw)

    monkeypatch.setattr(emanet.experiments.study, "evaluate", evaluate)
    monkeypatch.setattr(emanet.experiments.study, "train", train)
    calls["interrupt"] = True
    with pytest.raises(KeyboardInterrupt):
        run_study("iterations", out, **args)
    assert calls["train"] == 2 and calls["eval"] == [(1, 1), (1, 3), (2, 1)]
    checkpoints = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("iter_*.pt")}
    assert len(checkpoints) == 2

    calls.update(interrupt=False, eval=[], train=0)
    results = run_study("iterations", out, **args)  # the same command again: only the missing cell
    assert calls == {"interrupt": False, "eval": [(2, 3)], "train": 0}
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("iter_*.pt")} == checkpoints
    cells = results["cells"]
    assert set(cells) == {"T1", "T2"} and set(cells["T2"]) == {"1", "3"}
    assert all(0 <= c["mIoU"] <= 1 and c["images"] == 2 for v in cells.values() for c in v.values())
    saved = json.loads((out / "results.json").read_text())
    assert saved["cells"] == cells and any(k.startswith("train T1") for k in saved["seconds"])
    table = (out / "table.md").read_text()
    assert "| T_train \\ T_eval | 1 | 3 |" in table and f"{100 * cells['T2']['3']['mIoU']:.2f}" in table
    commands = (out / "commands.sh").read_text()
    assert "emanet train --config synthetic_toy" in commands and "model.num_stages=2" in commands
    assert f"emanet eval {out / 'runs' / 'T1'} eval.eval_stages=3" in commands
    if (out / "iterations.png").exists():
        assert "![" in table
    else:
        pytest.importorskip("matplotlib")  # without the extra only the figure is missing
        pytest.fail("matplotlib is installed but no figure was written")

    with pytest.raises(ValueError, match="other settings"):
        run_study("iterations", out, **{**args, "eval_stages": [1, 2]})

    # a study folder kept without its run folders (as docs/study is committed) is complete: nothing retrains
    shutil.rmtree(out / "runs")
    calls.update(eval=[], train=0)
    assert run_study("iterations", out, **args)["cells"] == cells and calls["train"] == 0 and not calls["eval"]


def test_bases_study_from_the_cli_and_with_an_existing_run(tmp_path):
    out = tmp_path / "bases"
    cli = [sys.executable, "-m", "emanet", "study", "bases", "--config", "synthetic_toy", *TINY, "--no-progress"]
    r = subprocess.run(
        [*cli, "--out", str(out), "--variants", "ema_grad_last"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    assert "| ema_grad_last | moving average + gradient through the last stage |" in r.stdout
    cfg = (out / "runs" / "ema_grad_last" / "config.yaml").read_text()
    assert "differentiable: last" in cfg and "bases_update: ema" in cfg and "renormalize: false" in cfg
    assert "model.differentiable=last" in (out / "commands.sh").read_text()
    # a second study that takes the first one's run instead of training it
    other = tmp_path / "reuse"
    run = out / "runs" / "ema_grad_last"
    r = subprocess.run(
        [*cli, "--out", str(other), "--variants", "ema_grad_last", "--run", f"ema_grad_last={run}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert not (other / "runs").exists() and f"# (existing run {run})" in (other / "commands.sh").read_text()
    first = json.loads((out / "results.json").read_text())["cells"]["ema_grad_last"]["None"]["mIoU"]
    assert json.loads((other / "results.json").read_text())["cells"]["ema_grad_last"]["None"]["mIoU"] == first
    bad = subprocess.run(
        [*cli, "--out", str(tmp_path / "bad"), "--run", f"T3={out}"], capture_output=True, text=True, timeout=600
    )
    assert bad.returncode == 2 and "not variants of this study" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_heads_study_trains_the_layouts_and_writes_per_class_iou_and_provenance(tmp_path):
    out = tmp_path / "heads"
    assert [v.name for v in plan("heads")] == ["reference", "reference_aux", "mmseg", "mmseg_aux"]
    assert plan("heads", variants=["mmseg_aux"])[0].overrides == ["model.head_layout=mmseg", "model.aux=true"]
    cli = [sys.executable, "-m", "emanet", "study", "heads", "--config", "synthetic_toy", *TINY, "--no-progress"]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # the thread count the machine record must show
    r = subprocess.run(
        [*cli, "--out", str(out), "--variants", "reference,mmseg_aux"],
        capture_output=True,
        text=True,
        timeout=600,
        env=one_thread,
    )
    assert r.returncode == 0, r.stderr
    cfg = (out / "runs" / "mmseg_aux" / "config.yaml").read_text()
    assert "head_layout: mmseg" in cfg and "aux: true" in cfg
    assert "head_layout: reference" in (out / "runs" / "reference" / "config.yaml").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["background", "tint_1", "tint_2", "tint_3", "tint_4"]
    for name in ("reference", "mmseg_aux"):
        cell = results["cells"][name]["None"]
        assert len(cell["IoU"]) == 5 and all(x is None or 0 <= x <= 1 for x in cell["IoU"])
        assert results["trained"][name]["seed"] == 0  # synthetic_toy's train.seed
        assert results["trained"][name]["machine"]["threads"] == 1 and results["trained"][name]["machine"]["torch"]
    assert results["command"].startswith("emanet study heads --config synthetic_toy train.iterations=2")
    assert results["command"].endswith(f"--out {out} --variants reference,mmseg_aux")
    table = (out / "table.md").read_text()
    assert "| variant | what | mIoU | aAcc | IoU background | IoU tint_1 |" in table
    background = results["cells"]["mmseg_aux"]["None"]["IoU"][0]
    assert "| mmseg_aux | mmseg + auxiliary FCN head on C4 | " in table and f"{100 * background:.2f}" in table
    assert f"Command: `{results['command']}`" in table and "Seed (train.seed): 0;" in table
    assert f"Trained on: {results['trained']['reference']['machine']['cpu']}, torch " in table
    assert "1 threads" in table and "Evaluated on:" in table
    with pytest.raises(ValueError, match="unknown heads variant.*fcn"):
        plan("heads", variants=["fcn"])
