"""Typed run configuration: dataclasses, YAML files and `a.b=value` overrides.

Every field has a typed default with its reason. Unknown keys are errors that name the key and suggest
the closest valid one; values are checked against the field's type before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from emanet.checkpoint import write_text_atomic
from emanet.data import DATASETS
from emanet.data.synthetic import SceneConfig
from emanet.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REFERENCE_SCALES,
    Compose,
    ResizeBackend,
    eval_transform,
)
from emanet.errors import ConfigError
from emanet.fields import (
    build,
    choices,
    describe_type,
    field_comments,
    literal_errors,
    problems_message,
    read_utf8,
    show_value,
)
from emanet.inference import Mode
from emanet.losses import Reduction
from emanet.models.backbone import BACKBONES, OUTPUT_STRIDES
from emanet.models.emanet import ModelConfig
from emanet.runtime import Precision

RECIPES_DIR = Path(__file__).parent / "configs"  # the packaged YAML recipes (package data: in the wheel)


@dataclass
class DataConfig:
    """The ``data`` section: which dataset, where, and its training and evaluation transforms."""

    dataset: str = "voc"  # voc, cityscapes, ade20k, folder, synthetic
    root: str | None = None  # dataset folder (not used by "synthetic")
    train_split: str = "train_aug"  # VOC + SBD, as the reference trains
    val_split: str = "val"
    crop_size: int = 513  # the reference's crop
    scales: list[float] = field(default_factory=lambda: list(REFERENCE_SCALES))  # list, or [min, max] range
    flip: bool = True
    jitter: float = 0.0  # photometric jitter strength (brightness/contrast/saturation); 0 = off
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # ImageNet, RGB in [0, 1]
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    eval_pad_multiple: int = 8  # the reference pads eval images (normalised, with 0) so H, W = 1 mod 8
    eval_pad_offset: int = 1
    eval_resize: list[int] | None = None  # [long, short]: mmseg's keep-ratio test Resize; predictions resized back
    resize_backend: ResizeBackend = "torch"  # eval_resize's bilinear: torch (8-bit rounded); cv2 = mmseg's OpenCV
    num_workers: int = 2
    options: dict[str, Any] = field(default_factory=dict)  # extra dataset arguments (e.g. synthetic scenes)
    on_bad_sample: Literal["raise", "skip"] = "raise"  # raise: stop naming the file; skip: another sample, counted


@dataclass
class OptimConfig:
    """The ``optim`` section: SGD with momentum and the poly learning-rate schedule."""

    lr: float = 0.009  # reference, batch 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    reference_groups: bool = True  # no decay on BN and biases, 2x LR on biases (the reference)
    power: float = 0.9  # poly schedule: lr * (1 - it / iterations) ** power
    warmup_iters: int = 0  # linear warm-up from 0 (not in the reference)


@dataclass
class LossConfig:
    """The ``loss`` section: cross-entropy reduction, auxiliary weight, ignored label."""

    reduction: Reduction = "all"  # "all": the reference's mean over all pixels; "valid": over labelled pixels
    aux_weight: float = 0.4  # used only with model.aux
    ignore_index: int = 255


Logger = Literal["tensorboard", "wandb"]  # train.loggers: emanet.train.log.LOGGERS writes each


@dataclass
class TrainConfig:
    """The ``train`` section: iterations, batch, precision, device, logging and checkpoints."""

    iterations: int = 30000  # optimizer steps (reference: 30k)
    batch_size: int = 16  # per process per micro-batch
    accum_steps: int = 1  # micro-batches per step: global batch = batch_size x processes x accum_steps
    precision: Precision = "fp32"  # fp32, bf16 (CUDA and CPU autocast), fp16 (CUDA, with a grad scaler)
    device: str = "auto"  # auto = cuda if available else cpu
    seed: int = 66  # the reference's seed
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise-repeatable CPU runs
    log_interval: int = 20
    eval_interval: int = 0  # 0 = evaluate only at the end
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 3
    out_dir: str = "runs/voc"
    max_eval_images: int = 0  # 0 = the whole validation split
    on_nonfinite: Literal["stop", "skip"] = "stop"  # stop: end the run naming the step; skip: drop it, counted
    sync_bn: bool = True  # SyncBatchNorm under torchrun on CUDA (plain BN on CPU/gloo)
    max_consecutive_skips: int = 10  # on_nonfinite=skip: stop after this many non-finite steps in a row (0 = never)
    freeze_bn: bool = False  # BN layers in eval mode: running statistics used, never updated (small batches)
    compile: bool = False  # torch.compile the model for training and evaluation (opt-in: slow cold start)
    loggers: list[Logger] = field(default_factory=list)  # besides metrics.jsonl: tensorboard (tb/), wandb


@dataclass
class EvalConfig:
    """The ``eval`` section: test-time mode (whole / sliding window), scales, flip and T_eval."""

    mode: Mode = "whole"  # whole or slide
    scales: list[float] = field(default_factory=lambda: [1.0])  # e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    flip: bool = False
    crop_size: list[int] | None = None  # sliding window size [H, W]
    stride: list[int] | None = None  # sliding window stride [H, W]
    eval_stages: int | None = None  # T at evaluation (the paper's T_train x T_eval study); None = model's


@dataclass
class Config:
    """A whole run's settings, one dataclass per YAML section; saved in every run folder and checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts, as written to config.yaml."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Refuse impossible values before anything runs: every problem found, each naming its key and what
        is expected (one problem: its message; several: one per line)."""
        errors = validation_errors(self)
        if errors:
            raise ConfigError(problems_message(errors))

    def eval_transform(self) -> Compose:
        """How evaluation and prediction read an image under these settings: (mmseg's keep-ratio resize with
        its backend,) normalise, pad bottom/right with 0 (the mean) to ``eval_pad_multiple``/``eval_pad_offset``;
        the one mapping from the data section to the transform (training's val split, Predictor, int8
        calibration)."""
        d = self.data
        return eval_transform(
            mean=d.mean,
            std=d.std,
            pad_multiple=d.eval_pad_multiple or None,
            pad_offset=d.eval_pad_offset,
            ignore_index=self.loss.ignore_index,
            keep_ratio_resize=d.eval_resize,
            resize_backend=d.resize_backend,
        )


# ----------------------------------------------------------------------------- every key (`emanet configs --keys`)

# allowed values of fields whose type is not a Literal: the tables their checks look them up in
TABLE_CHOICES = {"model.backbone": BACKBONES, "model.output_stride": OUTPUT_STRIDES, "data.dataset": DATASETS}


@dataclass
class KeyInfo:
    """One line of `emanet configs --keys`: a config key with its type, default, allowed values and reason."""

    key: str  # section.name
    type: str  # as a config file sees it: int, list[float], fp32 | bf16 | fp16, int | null
    default: str  # as YAML writes it
    allowed: list[str]  # the allowed values, when there is a closed list
    reason: str  # the comment beside the field in its dataclass


def config_keys(cls: type = Config, prefix: str = "") -> list[KeyInfo]:
    """Every key of ``cls`` (the run configuration by default), read from the dataclasses themselves: a field
    added to a section is listed without another word, its type and default from the field, its allowed values
    from its Literal type (or TABLE_CHOICES), its reason from the comment beside it."""
    hints, comments, defaults = typing.get_type_hints(cls), field_comments(cls), cls()
    keys = []
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            keys += config_keys(tp, f"{prefix}{f.name}.")
            continue
        key = f"{prefix}{f.name}"
        listed = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp  # a list's items
        allowed = choices(listed) or tuple(TABLE_CHOICES.get(key, ()))
        if allowed and bool in typing.get_args(listed):  # bool | Literal["last"]
            allowed = (False, True, *allowed)
        keys.append(
            KeyInfo(
                key, describe_type(tp), show_value(value), [show_value(v) for v in allowed], comments.get(f.name, "")
            )
        )
    return keys


# ----------------------------------------------------------------------------- validation


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _option_errors(cfg: Config) -> list[str]:
    """data.options against the dataset's own keywords (synthetic: SceneConfig fields, length, val_length)."""
    d, options = cfg.data, cfg.data.options
    if d.dataset == "synthetic":
        scene_fields = [f.name for f in dataclasses.fields(SceneConfig)]
        valid = scene_fields + ["length", "val_length"]
    else:
        params = inspect.signature(DATASETS[d.dataset].__init__).parameters.values()
        valid = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("transform", "seed", "strict")]
    unknown = [k for k in options if k not in valid]
    if unknown:
        what = f"the {d.dataset} dataset" + ("" if valid else " (it takes no options)")
        return [f"unknown key 'data.options.{k}' for {what}{_suggest(k, valid, 'data.options.')}" for k in unknown]
    errors = []
    if d.dataset == "synthetic":
        for key in ("length", "val_length"):
            value = options.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"data.options.{key} must be an int >= 1 (scenes per split), got {value!r}")
        scene = {k: v for k, v in options.items() if k in scene_fields}
        try:
            SceneConfig(**scene)
        except (TypeError, ValueError) as e:
            errors.append(f"data.options (synthetic scenes): {e}")
    return errors


def validation_errors(cfg: Config) -> list[str]:
    """Every impossible value in ``cfg``, as messages naming the key, the expected range and the value.

    Sizes: training pads each scaled image up to ``data.crop_size`` before cropping, and slide inference
    clips its window to images smaller than it, so a crop larger than an image is never an error. What is refused
    is a crop smaller than the output stride (no feature-map pixel) and a slide stride larger than the
    window (pixels that no window covers). Whether the dataset's class count matches model.num_classes is
    known only once the data is read: ``emanet check-data`` reports it (configs also serve inference).
    """
    # every Literal field of every section, once, from its type (also catches assignments after loading); the
    # model's are among ModelConfig.problems, the one check of the model's fields
    sections = [f.name for f in dataclasses.fields(cfg) if f.name != "model"]
    checks = _Checks([err for name in sections for err in literal_errors(getattr(cfg, name), f"{name}.")])
    for section in (_model_errors, _data_errors, _optim_loss_errors, _train_errors, _eval_errors):
        section(cfg, checks)
    return checks.errors


class _Checks:
    """Collects the messages of failed checks: ``need(ok, key, expected, value)``."""

    def __init__(self, errors: list[str]):
        self.errors = errors

    def need(self, ok: bool, key: str, expected: str, value: Any) -> None:
        if not ok:
            self.errors.append(f"{key} must be {expected}, got {value!r}")

    def positive_list(self, values: list, key: str, n: int | None = None) -> None:
        size_ok = len(values) >= 1 if n is None else len(values) == n
        expected = f"{n} positive numbers" if n else "a non-empty list of positive numbers"
        self.need(size_ok and all(v > 0 for v in values), key, expected, values)


def _model_errors(cfg: Config, c: _Checks) -> None:
    c.errors += cfg.model.problems()  # ModelConfig checks itself on construction; this catches later assignments


def _data_errors(cfg: Config, c: _Checks) -> None:
    m, d = cfg.model, cfg.data
    # data
    if d.dataset not in DATASETS:
        close = difflib.get_close_matches(d.dataset, list(DATASETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        c.errors.append(f"data.dataset must be one of {', '.join(sorted(DATASETS))}, got {d.dataset!r}{hint}")
    else:
        c.errors += _option_errors(cfg)
    c.need(
        d.crop_size >= m.output_stride,
        "data.crop_size",
        f">= model.output_stride ({m.output_stride}) so the feature map has a pixel",
        d.crop_size,
    )
    c.positive_list(d.scales, "data.scales")
    c.need(len(d.mean) == 3, "data.mean", "3 numbers (R, G, B in [0, 1])", d.mean)
    c.positive_list(d.std, "data.std", 3)
    c.need(d.jitter >= 0, "data.jitter", ">= 0 (0 = off)", d.jitter)
    c.need(d.eval_pad_multiple >= 0, "data.eval_pad_multiple", ">= 0 (0 = no padding)", d.eval_pad_multiple)
    c.need(d.eval_pad_offset >= 0, "data.eval_pad_offset", ">= 0", d.eval_pad_offset)
    if d.eval_resize is not None:
        c.positive_list(d.eval_resize, "data.eval_resize", 2)
        no_pad = "0 with data.eval_resize (mmseg resizes and does not pad at test time)"
        c.need(d.eval_pad_multiple == 0, "data.eval_pad_multiple", no_pad, d.eval_pad_multiple)
    c.need(d.num_workers >= 0, "data.num_workers", ">= 0 (0 = load in the main process)", d.num_workers)


def _optim_loss_errors(cfg: Config, c: _Checks) -> None:
    m, o, lo, t = cfg.model, cfg.optim, cfg.loss, cfg.train
    # optim, loss
    c.need(o.lr > 0, "optim.lr", "> 0", o.lr)
    c.need(0 <= o.momentum < 1, "optim.momentum", "in [0, 1)", o.momentum)
    c.need(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    c.need(o.power >= 0, "optim.power", ">= 0", o.power)
    c.need(
        0 <= o.warmup_iters <= t.iterations,
        "optim.warmup_iters",
        f"in 0..train.iterations ({t.iterations})",
        o.warmup_iters,
    )
    c.need(lo.aux_weight >= 0, "loss.aux_weight", ">= 0", lo.aux_weight)
    c.need(m.num_classes <= 255, "model.num_classes", "at most 255 (label maps are 8-bit, 255 = ignore)", m.num_classes)
    if m.num_classes <= 255:
        c.need(
            m.num_classes <= lo.ignore_index <= 255,
            "loss.ignore_index",
            f"in {m.num_classes}..255 (labels are 8-bit; not a class index)",
            lo.ignore_index,
        )


def _train_errors(cfg: Config, c: _Checks) -> None:
    t = cfg.train
    # train
    for name in ("iterations", "batch_size", "accum_steps", "log_interval", "checkpoint_interval"):
        c.need(getattr(t, name) >= 1, f"train.{name}", ">= 1", getattr(t, name))
    c.need(t.eval_interval >= 0, "train.eval_interval", ">= 0 (0 = only at the end)", t.eval_interval)
    c.need(t.keep_checkpoints >= 0, "train.keep_checkpoints", ">= 0 (0 = keep all)", t.keep_checkpoints)
    c.need(t.max_eval_images >= 0, "train.max_eval_images", ">= 0 (0 = the whole split)", t.max_eval_images)
    c.need(t.max_consecutive_skips >= 0, "train.max_consecutive_skips", ">= 0 (0 = no limit)", t.max_consecutive_skips)
    c.need(bool(t.out_dir), "train.out_dir", "a folder", t.out_dir)
    if t.device != "auto":
        try:
            torch.device(t.device)
        except (RuntimeError, ValueError):
            c.errors.append(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")


def _eval_errors(cfg: Config, c: _Checks) -> None:
    m, e = cfg.model, cfg.eval
    # eval
    c.positive_list(e.scales, "eval.scales")
    c.need(
        e.eval_stages is None or e.eval_stages >= 1, "eval.eval_stages", ">= 1 or null (= the model's)", e.eval_stages
    )
    if e.mode == "slide" and (e.crop_size is None or e.stride is None):
        c.errors.append(
            "eval.mode=slide needs eval.crop_size and eval.stride, e.g. eval.crop_size=[769,769] "
            f"eval.stride=[513,513]; got crop_size={e.crop_size!r}, stride={e.stride!r}"
        )
    for key, value in (("eval.crop_size", e.crop_size), ("eval.stride", e.stride)):
        if value is not None:
            c.positive_list(value, key, 2)
    if e.crop_size is not None and len(e.crop_size) == 2:
        c.need(
            min(e.crop_size) >= m.output_stride,
            "eval.crop_size",
            f">= model.output_stride ({m.output_stride}) on both sides",
            e.crop_size,
        )
        if e.stride is not None and len(e.stride) == 2:
            c.need(
                all(s <= w for s, w in zip(e.stride, e.crop_size)),
                "eval.stride",
                f"<= eval.crop_size {e.crop_size} (a larger stride leaves pixels no window covers)",
                e.stride,
            )


# ----------------------------------------------------------------------------- reading YAML


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping; the message names it and both lines."""


class _Loader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: PyYAML keeps the last one silently, so a second
    `model:` section would replace the first without a word."""


def _unique_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges on purpose
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = lines.get(key)
        except TypeError:  # an unhashable key: construct_mapping refuses it with its own message
            continue
        if first is not None:
            where = f"lines {first} and {line}" if first != line else f"both on line {line}"
            raise _DuplicateKey(f"key {key!r} is given twice ({where}); keep one")
        lines[key] = line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _read_yaml(path: Path) -> dict[str, Any]:
    """A config file's sections: UTF-8, valid YAML, no key twice, not empty, a mapping at the top."""
    text = read_utf8(path, lambda reason: ConfigError(f"{path}: {reason}"))
    try:
        data = _yaml(text)
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    sections = "model:, data:, optim:, loss:, train:, eval:"
    if data is None:  # nothing but comments or blank lines
        raise ConfigError(
            f"{path}: the config file is empty (no settings); it would mean the VOC defaults: to use those, "
            f"leave out --config; otherwise give the sections to change ({sections})"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections ({sections}), got a {type(data).__name__}"
        )
    return data


def _override_value(item: str, raw: str) -> Any:
    try:
        return _yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        reason = str(e) if isinstance(e, _DuplicateKey) else f"the value is not valid YAML: {e}"
        raise ConfigError(f"override {item!r}: {reason}") from None


def _set_path(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
    d[parts[-1]] = value


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def packaged_configs() -> dict[str, Path]:
    """The recipes shipped inside the package, by name (``voc_reference`` -> .../configs/voc_reference.yaml)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def resolve_config(name_or_path: str | Path) -> Path:
    """A YAML file that exists, or the name of a packaged recipe (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipes = packaged_configs()
    key = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if str(name_or_path) in (key, f"{key}.yaml") and key in recipes:  # a bare name, not a missing file path
        return recipes[key]
    hint = f"; did you mean --config {key}?" if key in recipes else ""
    names = ", ".join(recipes)
    raise FileNotFoundError(
        f"config file not found: {path}{hint} (give a YAML file or a packaged recipe: {names}; `emanet configs`)"
    )


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, base: dict[str, Any] | None = None
) -> Config:
    """Read a YAML file or a packaged recipe by name (or start from ``base``, e.g. a checkpoint's saved
    config, or the defaults) and apply `section.key=value` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _read_yaml(resolve_config(path))
    patch: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.iterations=100)")
        key, raw = item.split("=", 1)
        _set_path(patch, key.strip(), _override_value(item, raw))
    # every problem at once: unknown keys and values of the wrong type (those keep their defaults), then the
    # checks of the values (ranges, combinations)
    cfg, errors = build(Config, _merge(data, patch))
    errors += validation_errors(cfg)
    if errors:
        raise ConfigError(problems_message(errors))
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path`` (atomically: a failed write leaves no half file)."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
