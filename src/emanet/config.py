"""Typed run configuration: dataclasses, YAML files and `a.b=value` overrides.

Every field has a typed default with its reason. Unknown keys are errors that name the key and suggest
the closest valid one; values are checked against the field's type before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emanet.models.emanet import ModelConfig

REFERENCE_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]


@dataclass
class DataConfig:
    dataset: str = "voc"  # voc, cityscapes, ade20k, folder, synthetic
    root: str | None = None  # dataset folder (not used by "synthetic")
    train_split: str = "train_aug"  # VOC + SBD, as the reference trains
    val_split: str = "val"
    crop_size: int = 513  # the reference's crop
    scales: list[float] = field(default_factory=lambda: list(REFERENCE_SCALES))  # list, or [min, max] range
    flip: bool = True
    jitter: float = 0.0  # photometric jitter strength (brightness/contrast/saturation); 0 = off
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet, RGB in [0, 1]
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    eval_pad_multiple: int = 8  # the reference pads eval images so H, W = 1 mod 8
    eval_pad_offset: int = 1
    num_workers: int = 2
    options: dict[str, Any] = field(default_factory=dict)  # extra dataset arguments (e.g. synthetic scenes)
    on_bad_sample: str = "raise"  # raise: stop naming the file; skip: use another sample and count it


@dataclass
class OptimConfig:
    lr: float = 0.009  # reference, batch 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    reference_groups: bool = True  # no decay on BN and biases, 2x LR on biases (the reference)
    power: float = 0.9  # poly schedule: lr * (1 - it / iterations) ** power
    warmup_iters: int = 0  # linear warm-up from 0 (not in the reference)


@dataclass
class LossConfig:
    reduction: str = "all"  # "all": the reference's mean over all pixels; "valid": over labelled pixels
    aux_weight: float = 0.4  # used only with model.aux
    ignore_index: int = 255


@dataclass
class TrainConfig:
    iterations: int = 30000  # optimizer steps (reference: 30k)
    batch_size: int = 16  # per process per micro-batch
    accum_steps: int = 1  # micro-batches per step: global batch = batch_size x processes x accum_steps
    precision: str = "fp32"  # fp32, bf16 (CUDA and CPU autocast), fp16 (CUDA, with a grad scaler)
    device: str = "auto"  # auto = cuda if available else cpu
    seed: int = 66  # the reference's seed
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise-repeatable CPU runs
    log_interval: int = 20
    eval_interval: int = 0  # 0 = evaluate only at the end
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 3
    out_dir: str = "runs/voc"
    max_eval_images: int = 0  # 0 = the whole validation split
    on_nonfinite: str = "stop"  # stop: end the run naming the iteration; skip: drop the step and count it
    sync_bn: bool = True  # SyncBatchNorm under torchrun on CUDA (plain BN on CPU/gloo)


@dataclass
class EvalConfig:
    mode: str = "whole"  # whole or slide
    scales: list[float] = field(default_factory=lambda: [1.0])  # e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    flip: bool = False
    crop_size: list[int] | None = None  # sliding window size [H, W]
    stride: list[int] | None = None  # sliding window stride [H, W]
    eval_stages: int | None = None  # T at evaluation (the paper's T_train x T_eval study); None = model's


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Refuse impossible combinations before anything runs."""
        checks = [
            (self.train.iterations >= 1, "train.iterations must be >= 1"),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.accum_steps >= 1, "train.accum_steps must be >= 1"),
            (self.train.precision in ("fp32", "bf16", "fp16"), "train.precision must be fp32, bf16 or fp16"),
            (self.data.crop_size >= 1, "data.crop_size must be >= 1"),
            (len(self.data.scales) >= 1 and min(self.data.scales) > 0, "data.scales must be positive"),
            (self.loss.reduction in ("all", "valid"), "loss.reduction must be 'all' or 'valid'"),
            (self.eval.mode in ("whole", "slide"), "eval.mode must be 'whole' or 'slide'"),
            (self.eval.mode != "slide" or (self.eval.crop_size and self.eval.stride),
             "eval.mode=slide needs eval.crop_size and eval.stride"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (self.train.on_nonfinite in ("stop", "skip"), "train.on_nonfinite must be 'stop' or 'skip'"),
            (self.data.on_bad_sample in ("raise", "skip"), "data.on_bad_sample must be 'raise' or 'skip'"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ----------------------------------------------------------------------------- dict <-> dataclass


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arm, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}: expected {tp}, got {value!r}")
    if tp is Any:
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (arm,) = typing.get_args(tp)
        return [_check_type(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ValueError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ValueError(f"unknown config key '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(value, tp, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ validation (ModelConfig)
        raise ValueError(str(e)) from None


def _set_path(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"override {dotted}: '{p}' is not a section")
    d[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, base: dict[str, Any] | None = None
) -> Config:
    """Read a YAML file (or start from ``base``, e.g. a checkpoint's saved config, or the defaults) and apply
    `section.key=value` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    patch: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.iterations=100)")
        key, raw = item.split("=", 1)
        _set_path(patch, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    cfg = from_dict(Config, _merge(data, patch))
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
