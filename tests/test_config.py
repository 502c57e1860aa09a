"""Config files, overrides, type checks and helpful errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from emanet.config import Config, config_keys, load_config, save_config
from emanet.data import DATASETS
from emanet.errors import ConfigError


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


def test_exponent_floats_without_a_dot(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; float fields accept it, other fields still refuse it
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  weight_decay: 5e-4\n")
    assert load_config(f, ["optim.lr=1E-2"]).optim.weight_decay == 5e-4
    assert load_config(None, ["optim.lr=1e-2"]).optim.lr == 0.01
    with pytest.raises(ConfigError, match="train.iterations: expected int, got '1e3'"):
        load_config(None, ["train.iterations=1e3"])


def test_round_trip(tmp_path):
    cfg = load_config(
        None, ["model.num_classes=3", "data.dataset=synthetic", "data.options={length: 8, num_classes: 3}"]
    )
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.num_base=8", "did you mean 'model.num_bases'"),
        ("trian.iterations=5", "did you mean 'train'"),
        ("train.iteratons=5", r"unknown config key 'train\.iteratons'; did you mean 'train\.iterations'"),
        ("data.crop_sise=5", "did you mean 'data.crop_size'"),
        ("eval.strid=[8,8]", "did you mean 'eval.stride'"),
        ("train.iterations=ten", "train.iterations: expected int"),
        ("model.arch=deeplab", "model.arch"),
        ("iterations", "section.key=value"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


SYNTHETIC = ["data.dataset=synthetic", "model.num_classes=5"]


# One override per class of impossible value; each message names the key and says what is expected.
@pytest.mark.parametrize(
    "overrides, match",
    [
        (["optim.lr=-1"], r"optim\.lr must be > 0, got -1"),
        (["model.output_stride=4"], r"output_stride must be 8, 16 or 32"),
        (["model.num_bases=0"], r"num_bases must be >= 1"),
        (["model.num_stages=0"], r"num_stages must be >= 1"),
        (["model.eval_stages=0"], r"model\.eval_stages must be >= 1 or null"),
        (["model.dropout=1.0"], r"model\.dropout must be in \[0, 1\)"),
        (["model.bases_update=sgd"], r"model\.bases_update must be 'ema', 'none' or 'learned', got 'sgd'"),
        (["eval.scales=[0.5, 0]"], r"eval\.scales must be a non-empty list of positive numbers, got \[0\.5, 0\.0\]"),
        (["eval.scales=[]"], r"eval\.scales must be a non-empty list"),
        (["eval.eval_stages=0"], r"eval\.eval_stages must be >= 1 or null"),
        (["eval.mode=slide"], r"eval\.mode=slide needs eval\.crop_size and eval\.stride"),
        (
            ["eval.mode=slide", "eval.crop_size=[65,65]", "eval.stride=[66,33]"],
            r"eval\.stride must be <= eval\.crop_size \[65, 65\].*got \[66, 33\]",
        ),
        (["eval.crop_size=[4,64]"], r"eval\.crop_size must be >= model\.output_stride \(8\)"),
        (["eval.stride=[64]"], r"eval\.stride must be 2 positive numbers, got \[64\]"),
        (["data.crop_size=4"], r"data\.crop_size must be >= model\.output_stride \(8\).*got 4"),
        (["data.scales=[-0.5, 2.0]"], r"data\.scales must be a non-empty list of positive numbers"),
        (["data.num_workers=-1"], r"data\.num_workers must be >= 0"),
        (["data.mean=[0.5, 0.5]"], r"data\.mean must be 3 numbers"),
        (["data.std=[0.2, 0.2]"], r"data\.std must be 3 positive numbers, got \[0\.2, 0\.2\]"),
        (["data.std=[0.2, 0.0, 0.2]"], r"data\.std must be 3 positive numbers"),
        (["data.jitter=-0.1"], r"data\.jitter must be >= 0"),
        (["data.eval_pad_multiple=-8"], r"data\.eval_pad_multiple must be >= 0"),
        (["data.on_bad_sample=ignore"], r"data\.on_bad_sample must be 'raise' or 'skip'"),
        (["data.dataset=vocc"], r"data\.dataset must be one of ade20k, .*got 'vocc'; did you mean 'voc'"),
        (["data.options={ag: true}"], r"'data\.options\.ag' for the voc dataset; did you mean 'data\.options\.aug'"),
        (
            [*SYNTHETIC, "data.options={length: 8, tint_strenght: 0.1}"],
            r"'data\.options\.tint_strenght' for the synthetic dataset; did you mean 'data\.options\.tint_strength'",
        ),
        ([*SYNTHETIC, "data.options={length: 0}"], r"data\.options\.length must be an int >= 1"),
        ([*SYNTHETIC, "data.options={length: 8, max_objects: 100}"], r"data\.options \(synthetic scenes\):.*fits only"),
        (["optim.weight_decay=-0.0001"], r"optim\.weight_decay must be >= 0"),
        (["optim.momentum=1.0"], r"optim\.momentum must be in \[0, 1\), got 1\.0"),
        (["optim.momentum=-0.1"], r"optim\.momentum must be in \[0, 1\)"),
        (["optim.warmup_iters=50", "train.iterations=10"], r"warmup_iters must be in 0\.\.train\.iterations \(10\)"),
        (["loss.reduction=sum"], r"loss\.reduction must be 'all' or 'valid'"),
        (["loss.aux_weight=-1"], r"loss\.aux_weight must be >= 0"),
        (["loss.ignore_index=3"], r"loss\.ignore_index must be in 21\.\.255"),
        (["loss.ignore_index=-100"], r"loss\.ignore_index must be in 21\.\.255 \(labels are 8-bit"),
        (["train.iterations=0"], r"train\.iterations must be >= 1, got 0"),
        (["train.batch_size=0"], r"train\.batch_size must be >= 1"),
        (["train.accum_steps=0"], r"train\.accum_steps must be >= 1"),
        (["train.checkpoint_interval=0"], r"train\.checkpoint_interval must be >= 1"),
        (["train.keep_checkpoints=-1"], r"train\.keep_checkpoints must be >= 0"),
        (["train.log_interval=0"], r"train\.log_interval must be >= 1"),
        (["train.eval_interval=-1"], r"train\.eval_interval must be >= 0"),
        (["train.precision=fp8"], r"train\.precision must be 'fp32', 'bf16' or 'fp16'"),
        (["train.device=gpu"], r"train\.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        (["train.on_nonfinite=ignore"], r"train\.on_nonfinite must be 'stop' or 'skip'"),
    ],
)
def test_impossible_values_are_refused_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_edge_values_that_are_allowed():
    cfg = load_config(
        None,
        [
            "optim.momentum=0",
            "optim.weight_decay=0",
            "train.keep_checkpoints=0",
            "data.num_workers=0",
            "eval.mode=slide",
            "eval.crop_size=[8,8]",
            "eval.stride=[8,8]",
            "data.crop_size=8",
            "eval.eval_stages=1",
            "train.device=cuda:1",
            "data.options={aug: true}",
            "data.eval_pad_multiple=0",
        ],
    )
    assert cfg.eval.stride == [8, 8] and cfg.train.device == "cuda:1" and cfg.data.options == {"aug": True}
    synthetic = load_config(None, [*SYNTHETIC, "data.options={length: 4, val_length: 2, image_size: 64}"])
    assert synthetic.data.options["image_size"] == 64


def test_all_problems_are_listed_at_once():
    with pytest.raises(ConfigError, match=r"3 config problems:\n  .*optim\.lr.*\n  .*train\.batch_size.*\n  .*eval"):
        load_config(None, ["optim.lr=0", "train.batch_size=0", "eval.eval_stages=0"])


MISTAKES = {  # two misspelled keys and a value out of range, a wrong type and a model value that its check refuses
    "train.iteratons": "5",
    "data.crop_sise": "33",
    "optim.momentum": "1.5",
    "train.batch_size": "two",
    "model.num_bases": "0",
}


def test_every_unknown_key_and_every_bad_value_are_listed_in_one_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("".join(f"{k.split('.')[0]}:\n  {k.split('.')[1]}: {v}\n" for k, v in list(MISTAKES.items())[:3]))
    overrides = [f"{k}={v}" for k, v in list(MISTAKES.items())[3:]]
    with pytest.raises(ConfigError) as e:
        load_config(f, overrides)
    lines = str(e.value).splitlines()
    assert lines[0] == "5 config problems:"
    assert sorted(line.strip() for line in lines[1:]) == [
        "model.num_bases must be >= 1, got 0",
        "optim.momentum must be in [0, 1), got 1.5",
        "train.batch_size: expected int, got 'two'",
        "unknown config key 'data.crop_sise'; did you mean 'data.crop_size'?",
        "unknown config key 'train.iteratons'; did you mean 'train.iterations'?",
    ]


def test_validate_catches_values_assigned_after_loading():
    cfg = load_config()
    cfg.model.num_bases = 0  # bypasses ModelConfig.__post_init__
    with pytest.raises(ConfigError, match=r"model\.num_bases must be >= 1, got 0"):
        cfg.validate()


def test_nested_yaml_typo_names_the_full_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  iteratons: 5\n")
    with pytest.raises(ConfigError, match=r"'train\.iteratons'; did you mean 'train\.iterations'"):
        load_config(f)
    f.write_text("data:\n  options:\n    aug: true\n  num_worker: 2\n")
    with pytest.raises(ConfigError, match=r"did you mean 'data\.num_workers'"):
        load_config(f)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_config_files_are_utf8_a_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + b"train:\n  iterations: 7\n")
    assert load_config(path).train.iterations == 7
    path.write_bytes("train:\n  out_dir: caf\xe9\n".encode("cp1252"))
    with pytest.raises(ConfigError, match=r"bom.yaml: not UTF-8 text: byte 0xe9 at offset 21 .*UTF-8 is expected"):
        load_config(path)


def test_duplicate_keys_are_refused_in_files_and_overrides_but_merges_are_not(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  options: {length: 2, length: 3}\n")
    with pytest.raises(ConfigError, match="c.yaml: key 'length' is given twice \\(both on line 2\\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="override 'data.options=.*key 'a' is given twice"):
        load_config(None, ["data.options={a: 1, a: 2}"])
    path.write_text("eval: &e\n  flip: true\ntrain:\n  seed: 3\n")  # an anchor alone is no duplicate
    assert load_config(path).eval.flip is True


def test_an_override_that_is_not_valid_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'train.iterations=\[1,': the value is not valid YAML"):
        load_config(None, ["train.iterations=[1,"])


@dataclass
class Extra:  # a section as a later change might add it
    speed: Literal["slow", "fast"] = "fast"  # how fast to go
    # A heading that describes nothing
    ratio: float | None = None  # a ratio,
    # continued here
    size: list[int] = field(default_factory=lambda: [3, 4])


@dataclass
class Whole:
    extra: Extra = field(default_factory=Extra)
    on: bool = True  # whether


def test_config_keys_follow_the_dataclasses_so_a_new_field_is_listed():
    keys = {k.key: k for k in config_keys(Whole)}
    assert list(keys) == ["extra.speed", "extra.ratio", "extra.size", "on"]
    speed, ratio, size, on = keys.values()
    assert (speed.type, speed.default, speed.allowed, speed.reason) == (
        "slow | fast",
        "fast",
        ["slow", "fast"],
        "how fast to go",
    )
    assert (ratio.type, ratio.default, ratio.reason) == ("float | null", "null", "a ratio, continued here")
    assert (size.type, size.default, size.allowed, size.reason) == ("list[int]", "[3, 4]", [], "")
    assert (on.type, on.default, on.reason) == ("bool", "true", "whether")


def test_config_keys_name_the_allowed_values_of_every_closed_field():
    keys = {k.key: k for k in config_keys()}
    assert keys["model.differentiable"].allowed == ["false", "true", "last"]
    assert keys["data.dataset"].allowed == sorted(keys["data.dataset"].allowed, key=list(DATASETS).index)
    assert set(keys["data.dataset"].allowed) == set(DATASETS)
    assert keys["model.output_stride"].allowed == ["8", "16", "32"]
    assert keys["train.on_nonfinite"].allowed == ["stop", "skip"]


def test_a_logger_that_does_not_exist_is_refused_on_load_and_after_assignment():
    with pytest.raises(ConfigError, match=r"train\.loggers\[1\] must be 'tensorboard' or 'wandb', got 'mlflow'"):
        load_config(None, ["train.loggers=[wandb, mlflow]"])
    cfg = load_config(None, ["train.loggers=[tensorboard]"])
    cfg.train.loggers.append("comet")
    with pytest.raises(ConfigError, match=r"train\.loggers items must be 'tensorboard' or 'wandb', got 'comet'"):
        cfg.validate()
