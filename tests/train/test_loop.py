"""Training and evaluation loops: a CLI run on the synthetic set, eval from its checkpoint, resume,
parameter groups, the poly schedule."""

from __future__ import annotations

import json

import pytest
import torch

from emanet.checkpoint import latest_checkpoint, load_checkpoint
from emanet.cli.main import main
from emanet.config import load_config
from emanet.models.emanet import ModelConfig, build_model
from emanet.train.setup import param_groups, poly_factor, poly_schedule
from tests.conftest import tiny_model, tiny_run

TINY = tiny_run("train.batch_size=2", "train.log_interval=1", size=48, length=8, val_length=3, sizes=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_iterations_then_eval_from_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--no-progress", *TINY, "train.iterations=2", f"train.out_dir={run}"]) == 0
    assert (run / "config.yaml").is_file() and (run / "eval.json").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines if x["kind"] == "train"] == [1, 2]
    ckpt = load_checkpoint(latest_checkpoint(run).path)
    assert ckpt["iteration"] == 2 and ckpt["config"]["model"]["num_bases"] == 4
    capsys.readouterr()
    assert main(["eval", str(run), "--no-progress", "eval.eval_stages=5"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out
    res = json.loads((run / "eval_iter_0000002.json").read_text())
    assert res["eval"]["eval_stages"] == 5 and 0 <= res["mIoU"] <= 1 and res["images"] == 3


def test_resume_continues_from_the_saved_iteration(tmp_path):
    run = tmp_path / "run"
    common = ["--no-progress", *TINY, f"train.out_dir={run}", "train.checkpoint_interval=1"]
    assert main(["train", *common, "train.iterations=2"]) == 0
    assert main(["train", *common, "train.iterations=4", "--resume"]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines if x["kind"] == "train"] == [1, 2, 3, 4]  # 3 and 4 only after resume
    assert load_checkpoint(latest_checkpoint(run).path)["iteration"] == 4


def test_bad_override_is_an_error_message(tmp_path, capsys):
    assert main(["train", *TINY, "model.num_base=3", f"train.out_dir={tmp_path}"]) == 2
    assert "did you mean 'model.num_bases'" in capsys.readouterr().err


def test_reference_param_groups():
    model = build_model(tiny_model())
    groups = param_groups(model, lr=0.01, weight_decay=1e-4, reference=True)
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    conv_w, bn_w = named["backbone.conv1.weight"], named["backbone.bn1.weight"]
    bias = named["head.classifier.bias"]
    assert by_id[id(conv_w)]["weight_decay"] == 1e-4 and by_id[id(conv_w)]["lr"] == 0.01
    assert by_id[id(bn_w)]["weight_decay"] == 0.0 and by_id[id(bn_w)]["lr"] == 0.01
    assert by_id[id(bias)]["weight_decay"] == 0.0 and by_id[id(bias)]["lr"] == 0.02
    assert id(named["head.context.conv_in.weight"]) not in by_id  # frozen: in no group
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable


def test_poly_schedule():
    assert poly_factor(0, 100, 0.9) == 1.0
    assert poly_factor(50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert poly_factor(100, 100, 0.9) == 0.0
    assert poly_factor(0, 100, 0.9, warmup=10) == pytest.approx(0.1)


def test_poly_schedule_scales_each_groups_rate_and_resumes_at_its_position():
    cfg = load_config(None, ["optim.lr=0.01", "optim.warmup_iters=2", "train.iterations=10"])
    model = build_model(tiny_model())
    optimizer = torch.optim.SGD(param_groups(model, 0.01, 1e-4, reference=True), lr=0.01, momentum=0.9)
    scheduler = poly_schedule(optimizer, cfg)
    rates = []
    for _ in range(5):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for it, row in enumerate(rates):  # what the loop wrote by hand before: lr x factor, then x lr_mult
        want = 0.01 * poly_factor(it, 10, 0.9, warmup=2)
        assert row == [want * g["lr_mult"] for g in optimizer.param_groups]
    state = scheduler.state_dict()
    resumed = torch.optim.SGD(param_groups(model, 0.01, 1e-4, reference=True), lr=0.01, momentum=0.9)
    resumed.load_state_dict(optimizer.state_dict())
    again = poly_schedule(resumed, cfg, state)
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert again.last_epoch == scheduler.last_epoch == 5
    faster = load_config(None, ["optim.lr=0.02", "optim.warmup_iters=2", "train.iterations=10"])
    poly_schedule(resumed, faster, state)  # a resume may change optim.lr: the config's rate, not the checkpoint's
    assert resumed.param_groups[0]["lr"] == 0.02 * poly_factor(5, 10, 0.9, warmup=2)


def test_accumulated_batch_feeds_the_bases_once_per_step(tmp_path):
    # accum_steps=2: the EMA unit defers its update to the optimizer step
    run = tmp_path / "run"
    assert (
        main(["train", "--no-progress", *TINY, "train.iterations=1", "train.accum_steps=2", f"train.out_dir={run}"])
        == 0
    )
    ckpt = load_checkpoint(latest_checkpoint(run).path)
    init = build_model(ModelConfig(**ckpt["config"]["model"]))
    assert not torch.equal(ckpt["model"]["head.context.bases"], init.head.context.bases)


def test_bad_samples_are_skipped_and_counted_per_file(make_folder, tmp_path, capsys):
    root, _ = make_folder(split="train")
    make_folder(split="val", names=("v",))
    (root / "images" / "train" / "a.jpg").write_bytes(b"not a jpeg")  # a corrupt training image
    run = tmp_path / "run"
    args = [
        "train",
        "--no-progress",
        *TINY,
        "model.num_classes=3",
        "data.dataset=folder",
        f"data.root={root}",
        "data.train_split=train",
        "data.crop_size=16",
        "data.options={}",
        "data.on_bad_sample=skip",
        "train.batch_size=3",
        "train.iterations=2",
        f"train.out_dir={run}",
    ]
    assert main(args) == 0
    lines = (run / "bad_samples.txt").read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith(str(root / "images" / "train" / "a.jpg")) for line in lines)
    assert json.loads((run / "eval.json").read_text())["train"]["bad_samples"] == 1  # read twice, one file
    assert "bad training files: 1" in capsys.readouterr().out
