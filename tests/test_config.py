"""Config files, overrides, type checks and helpful errors."""

from __future__ import annotations

import pytest

from emanet.config import Config, load_config, save_config


def test_defaults_are_the_reference_recipe():
    cfg = load_config()
    assert cfg.optim.lr == 0.009 and cfg.train.batch_size == 16 and cfg.train.iterations == 30000
    assert cfg.model.num_bases == 64 and cfg.model.stem == "deep" and cfg.loss.reduction == "all"


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  num_bases: 16\n  backbone: resnet50\ntrain:\n  iterations: 10\n")
    cfg = load_config(f, ["train.iterations=20", "optim.lr=0.01", "data.scales=[0.5, 1.0]", "eval.eval_stages=5"])
    assert cfg.model.num_bases == 16 and cfg.model.backbone == "resnet50"
    assert cfg.train.iterations == 20 and cfg.optim.lr == 0.01 and cfg.data.scales == [0.5, 1.0]
    assert cfg.eval.eval_stages == 5


def test_round_trip(tmp_path):
    cfg = load_config(None, ["model.num_classes=3", "data.options={length: 8}"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.num_base=8", "did you mean 'model.num_bases'"),
        ("trian.iterations=5", "did you mean 'train'"),
        ("train.iterations=ten", "train.iterations: expected int"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("model.output_stride=4", "output_stride must be 8, 16 or 32"),
        ("model.num_bases=0", "num_bases must be >= 1"),
        ("model.arch=deeplab", "model.arch"),
        ("train.precision=fp8", "precision"),
        ("eval.mode=slide", "crop_size and eval.stride"),
        ("iterations", "section.key=value"),
    ],
)
def test_bad_values_are_refused_with_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
