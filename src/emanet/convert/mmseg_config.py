"""mmsegmentation checkpoint metadata: the config text that mmcv 0.x (``meta['config']``) and mmengine 1.x
(``meta['cfg']``) embed, read with ``ast`` (constants, tuples, lists, dicts, ``dict(...)`` calls, names assigned
earlier; never executed), and the settings our model needs from it (align_corners, EM stages and momentum,
dropout, dilations, normalisation, test padding, resize and sliding window). Used by convert.py.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

from emanet.errors import ModelSourceError
from emanet.models.backbone import OUTPUT_STRIDES

__all__ = [
    "PUBLISHED_PIPELINES",
    "Unresolved",
    "config_name",
    "implied_by_name",
    "override_text",
    "parse_mmseg_meta",
    "read_config_text",
]


class Unresolved:
    """A value in a config text that is not a literal (a call other than dict(), an unknown name, ...)."""

    def __init__(self, source: str):
        self.source = source

    def __repr__(self) -> str:
        return f"<not a literal: {self.source}>"


def _literal(node: ast.AST, names: Mapping[str, Any]) -> Any:
    """A config-text expression -> its value: constants, tuples, lists, dicts, ``dict(...)`` calls and names
    assigned earlier in the text; anything else becomes an ``Unresolved`` (nothing is ever executed)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_literal(e, names) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        out: dict[Any, Any] = {}
        for k, v in zip(node.keys, node.values):
            value = _literal(v, names)
            if k is None:  # {**other}
                out.update(value if isinstance(value, dict) else {})
            else:
                out[_literal(k, names)] = value
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        out = {}
        for kw in node.keywords:
            value = _literal(kw.value, names)
            if kw.arg is None:  # dict(**other)
                out.update(value if isinstance(value, dict) else {})
            else:
                out[kw.arg] = value
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, names)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    return Unresolved(ast.unparse(node)[:60])


def read_config_text(text: str) -> dict[str, Any]:
    """The top-level ``name = value`` assignments of an mmcv/mmengine config text (Python source), values
    read by ``_literal``; other statements are ignored. A text that is not Python is a ModelSourceError."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise ModelSourceError(
            f"the checkpoint's mmseg config text is not Python source (line {e.lineno}: {e.msg})"
        ) from None
    except (RecursionError, MemoryError):
        raise ModelSourceError("the checkpoint's mmseg config text is nested too deeply to read") from None
    names: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                names[stmt.targets[0].id] = _literal(stmt.value, names)
            except RecursionError:
                raise ModelSourceError("the checkpoint's mmseg config text is nested too deeply to read") from None
    return names


def _section(d: Any, *keys: str) -> dict[str, Any]:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d if isinstance(d, dict) else {}


def _is(value: Any, *types: type) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _pair_of_ints(value: Any) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is(v, int) for v in value):
        return [int(v) for v in value]
    return None


# (strides, dilations) -> output stride: the backbone's table read backwards
_OUTPUT_STRIDES = {layout: output_stride for output_stride, layout in OUTPUT_STRIDES.items()}


def _norm_settings(cfg: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
    """mean/std/RGB order: the model's or the top-level data_preprocessor (1.x), or img_norm_cfg (0.x)."""
    for norm in (
        _section(model, "data_preprocessor"),
        _section(cfg, "data_preprocessor"),
        _section(cfg, "img_norm_cfg"),
    ):
        if "mean" in norm and "std" in norm:
            return norm
    return {}


def parse_mmseg_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Class names, palette and the settings that matter, from an mmseg checkpoint's 'meta' entry.

    mmseg 0.x stores CLASSES, PALETTE and the config text (``config``, mmcv's pretty text); 1.x stores
    ``dataset_meta`` and the config text as ``cfg`` (mmengine's: sorted keys, sequences over several lines).
    The text is parsed as Python source with ``ast``, literals and ``dict(...)`` calls only (never executed).
    Returns {'model': ..., 'data': ..., 'eval': ...} config fields, 'notes' for the user, 'config_text' (whether
    the meta has one), 'read' (what was read from it, in words) and, when found, 'class_names', 'palette' and
    'bgr'.
    """
    out: dict[str, Any] = {"model": {}, "data": {}, "eval": {}, "notes": [], "read": [], "config_text": False}
    _dataset_meta(meta, out)
    text = meta.get("config", meta.get("cfg"))
    if not isinstance(text, str):
        return out
    out["config_text"] = True
    cfg = read_config_text(text)
    model = _section(cfg, "model")
    found: list[str] = []  # what was read, reported in one note
    _head_settings(_section(model, "decode_head"), out, found)
    _output_stride(_section(model, "backbone"), out, found)
    norm = _norm_settings(cfg, model)
    _normalisation(norm, out, found)
    _test_padding(norm, out, found)
    _test_mode(_section(model, "test_cfg") or _section(cfg, "test_cfg"), out, found)  # 0.x: may be top-level
    _test_resize(cfg, out, found)
    if found:
        out["notes"].append("from the checkpoint's mmseg config: " + ", ".join(found))
    out["read"] = found
    return out


# ----------------------------------------------------------------------------- without config text

# The test pipelines of mmseg's published EMANet configs (configs/emanet: emanet_r{50,101}-d8_512x1024_80k_cityscapes
# / emanet_r{50,101}-d8_4xb2-80k_cityscapes-512x1024, and the same for 769x769; only the 80k weights are published),
# by the training crop in their names, as the overrides that reproduce them. A checkpoint without config text
# whose name shows one of these crops converts only with these settings (or --assume-defaults): 769x769 models
# test with align_corners=True and 769/513 sliding windows, which our mmseg defaults are not. docs/convert.md
# shows this table.
PUBLISHED_PIPELINES: dict[tuple[int, int], dict[str, Any]] = {
    (512, 1024): {"model.align_corners": False, "eval.mode": "whole", "data.eval_resize": [2048, 1024]},
    (769, 769): {
        "model.align_corners": True,
        "eval.mode": "slide",
        "eval.crop_size": [769, 769],
        "eval.stride": [513, 513],
        "data.eval_resize": [2049, 1025],
    },
}
# what an unknown crop leaves open: the settings a user must give (mode slide also needs crop_size and stride)
PIPELINE_KEYS = ("model.align_corners", "eval.mode", "data.eval_resize")

_CROP = re.compile(r"(?<![0-9])([0-9]{3,4})x([0-9]{3,4})(?![0-9])")
_DEPTH_STRIDE = re.compile(r"r(?:18|34|50|101|152)(?:b|v1c)?-d(8|16|32)(?![0-9])")
_EXTENSION = re.compile(r"\.(py|pth|pt|ckpt|bin|safetensors)$")
_RUN_STAMP = re.compile(r"[_-]20[0-9]{6}_[0-9]{6}.*$")  # mmengine's experiment_name / published files' suffix


def config_name(meta: Mapping[str, Any], file_name: str) -> str | None:
    """The mmseg config a checkpoint was trained with, by name: 0.x ``meta['exp_name']`` (the config file),
    mmengine's ``meta['experiment_name']`` (config name + time stamp), or a published file's name."""
    for candidate in (meta.get("exp_name"), meta.get("experiment_name"), file_name):
        if isinstance(candidate, str) and (_CROP.search(candidate) or _DEPTH_STRIDE.search(candidate)):
            stem = _EXTENSION.sub("", candidate.rsplit("/", 1)[-1])
            return _RUN_STAMP.sub("", stem)
    return None


def implied_by_name(name: str) -> tuple[dict[str, Any], list[str], str]:
    """What an mmseg config name says about the settings a checkpoint needs: (overrides it implies, keys it
    leaves open, the words of the evidence). The crop picks a PUBLISHED_PIPELINES entry (an unknown crop
    leaves PIPELINE_KEYS open); ``-d16`` / ``-d32`` imply the output stride."""
    implied: dict[str, Any] = {}
    open_keys: list[str] = []
    words = []
    stride = _DEPTH_STRIDE.search(name)
    if stride and int(stride.group(1)) != 8:
        implied["model.output_stride"] = int(stride.group(1))
        words.append(f"output stride {stride.group(1)} (-d{stride.group(1)})")
    crop = _CROP.search(name)
    if crop:
        size = (int(crop.group(1)), int(crop.group(2)))
        words.append(f"{size[0]}x{size[1]} training crops")
        if size in PUBLISHED_PIPELINES:
            implied.update(PUBLISHED_PIPELINES[size])
        else:
            open_keys = list(PIPELINE_KEYS)
    return implied, open_keys, " and ".join(words)


def override_text(key: str, value: Any) -> str:
    """``section.key=value`` as the command line takes it (lists without spaces, booleans lower case)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list):  # floats to 6 digits: 0.224, not 0.22399999999999998
        text = "[" + ",".join(format(v, ".6g") if isinstance(v, float) else str(v) for v in value) + "]"
    else:
        text = str(value)
    return f"{key}={text}"


def _dataset_meta(meta: Mapping[str, Any], out: dict[str, Any]) -> None:
    """Class names and palette: 1.x ``dataset_meta`` {classes, palette}, 0.x top-level CLASSES / PALETTE."""
    dmeta = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), Mapping) else meta
    classes, palette = dmeta.get("classes", dmeta.get("CLASSES")), dmeta.get("palette", dmeta.get("PALETTE"))
    if isinstance(classes, (list, tuple)):
        out["class_names"] = [str(c) for c in classes]
    if isinstance(palette, (list, tuple)):
        out["palette"] = [tuple(int(v) for v in c) for c in palette]


# decode_head key -> (ModelConfig field, type); a value of another type is named in a note, not guessed
_HEAD_FIELDS = (
    ("num_stages", "num_stages", int),
    ("momentum", "momentum", float),
    ("dropout_ratio", "dropout", float),
    ("align_corners", "align_corners", bool),
)


def _head_settings(head: Mapping[str, Any], out: dict[str, Any], found: list[str]) -> None:
    """EM stages, bases momentum, dropout and align_corners from the config's decode_head (an EMAHead)."""
    if head and head.get("type") != "EMAHead":
        out["notes"].append(f"the checkpoint's config has decode_head type {head.get('type')!r}, not 'EMAHead'")
    for key, field_, kind in _HEAD_FIELDS:
        value = head.get(key)
        if _is(value, bool) if kind is bool else _is(value, int) or (kind is float and _is(value, float)):
            out["model"][field_] = kind(value)
            found.append(f"{key}={value}")
        elif key in head:
            out["notes"].append(
                f"decode_head.{key}={value!r} is not a {kind.__name__} literal: model.{field_} keeps the mmseg "
                f"default (override it if that is wrong)"
            )


def _output_stride(trunk: Mapping[str, Any], out: dict[str, Any], found: list[str]) -> None:
    """model.output_stride from the backbone's strides and dilations; layouts we cannot reproduce are errors."""
    strides, dilations = trunk.get("strides"), trunk.get("dilations")
    if isinstance(strides, (list, tuple)) and isinstance(dilations, (list, tuple)):
        layout = (tuple(strides), tuple(dilations))
        if layout not in _OUTPUT_STRIDES:
            known = ", ".join(f"{s}/{d}" for s, d in _OUTPUT_STRIDES)
            raise ModelSourceError(
                f"mmseg backbone strides={layout[0]} dilations={layout[1]}: only the "
                f"{'/'.join(f'd{os}' for os in OUTPUT_STRIDES)} layouts {known} convert"
            )
        out["model"]["output_stride"] = _OUTPUT_STRIDES[layout]
        found.append(f"output stride {out['model']['output_stride']}")
        if out["model"]["output_stride"] != 32 and trunk.get("contract_dilation") is not True:
            raise ModelSourceError(
                "mmseg backbone without contract_dilation=True: its first dilated blocks use the full "
                "dilation, ours half of it (not supported)"
            )
    if isinstance(trunk.get("multi_grid"), (list, tuple)):
        raise ModelSourceError("mmseg backbone with multi_grid: not supported by this converter")


def _normalisation(norm: Mapping[str, Any], out: dict[str, Any], found: list[str]) -> None:
    """data.mean/std (0-255 in mmseg, 0-1 here) and whether the model takes BGR input."""
    mean, std = norm.get("mean"), norm.get("std")
    if all(isinstance(v, (list, tuple)) and len(v) == 3 and all(_is(x, int, float) for x in v) for v in (mean, std)):
        out["data"]["mean"] = [float(v) / 255 for v in mean]
        out["data"]["std"] = [float(v) / 255 for v in std]
        found.append(f"mean={list(mean)} std={list(std)}")
    rgb = norm.get("bgr_to_rgb", norm.get("to_rgb"))
    if rgb is False:
        out["bgr"] = True
        found.append("to_rgb=False (a BGR model)")


def _test_mode(test: Mapping[str, Any], out: dict[str, Any], found: list[str]) -> None:
    """eval.mode (and the sliding window's crop and stride) from the test_cfg."""
    if test.get("mode") == "slide":
        crop, stride = _pair_of_ints(test.get("crop_size")), _pair_of_ints(test.get("stride"))
        if crop is None or stride is None:
            raise ModelSourceError(
                f"mmseg test_cfg mode='slide' with crop_size={test.get('crop_size')!r} "
                f"stride={test.get('stride')!r}: expected (height, width) pairs of ints"
            )
        out["eval"].update(mode="slide", crop_size=crop, stride=stride)
        found.append(f"slide inference {crop[0]}x{crop[1]} stride {stride[0]}x{stride[1]}")
    elif test.get("mode") == "whole":
        out["eval"]["mode"] = "whole"
        found.append("whole-image inference")


def _test_resize(cfg: Mapping[str, Any], out: dict[str, Any], found: list[str]) -> None:
    """The test pipeline's keep-ratio Resize (1.x ``Resize(scale, keep_ratio)``, 0.x ``MultiScaleFlipAug(img_scale)``
    around ``Resize(keep_ratio)``) -> data.eval_resize [long, short]."""
    steps = cfg.get("test_pipeline")
    for step in steps if isinstance(steps, list) else []:
        if not isinstance(step, dict):
            continue
        if step.get("type") == "Resize" and "scale" in step:
            scale, keep = step["scale"], step.get("keep_ratio", False)
        elif step.get("type") == "MultiScaleFlipAug" and "img_scale" in step:
            inner = [t for t in step.get("transforms") or [] if isinstance(t, dict) and t.get("type") == "Resize"]
            scale, keep = step["img_scale"], bool(inner) and inner[0].get("keep_ratio", True) is True
        else:
            continue
        pair = _pair_of_ints(scale)
        if pair is None or keep is not True:
            out["notes"].append(
                f"not reproduced: the test pipeline's Resize scale={scale!r} keep_ratio={keep!r} "
                "(only a keep-ratio resize to one (long, short) scale converts, as data.eval_resize)"
            )
            return
        out["data"].update(eval_resize=[max(pair), min(pair)], resize_backend="cv2")  # mmcv's default backend
        found.append(f"test Resize keep_ratio to {tuple(scale)} (data.eval_resize, OpenCV bilinear)")
        resize = step if step.get("type") == "Resize" else inner[0]
        if (resize.get("backend", "cv2"), resize.get("interpolation", "bilinear")) != ("cv2", "bilinear"):
            out["notes"].append(f"not reproduced: the test Resize's {resize!r} (only OpenCV bilinear converts)")
        return


def _test_padding(norm: Mapping[str, Any], out: dict[str, Any], found: list[str]) -> None:
    """SegDataPreProcessor pads test images only when it has a test_cfg (size / size_divisor)."""
    test = _section(norm, "test_cfg")
    if not test:
        return
    divisor, size = test.get("size_divisor"), test.get("size")
    if size is not None:
        raise ModelSourceError(
            f"mmseg data_preprocessor test_cfg size={size!r} (padding every test image to a fixed "
            "size) is not supported"
        )
    if _is(divisor, int) and divisor > 1:
        pad_val = norm.get("pad_val", 0)
        if pad_val != 0:
            raise ModelSourceError(
                f"mmseg data_preprocessor pad_val={pad_val!r} with test padding: only 0 (the "
                "normalised mean, as our eval padding) is supported"
            )
        out["data"].update(eval_pad_multiple=int(divisor), eval_pad_offset=0)
        found.append(f"test padding to a multiple of {divisor}")
