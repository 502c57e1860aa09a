"""Typed dataclass fields: dicts (YAML, JSON, checkpoints) -> dataclasses with every value checked against its
field's type, and the allowed values of ``Literal`` fields. Imports only emanet.errors, so the model layer
(ModelConfig) and the run configuration (config.py) share one implementation. A value or key that does not
fit is a ``ConfigError`` naming the key. ``read_utf8`` reads the text files users write (configs, class lists).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emanet.errors import ConfigError

_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arm, key)
            except ConfigError:
                pass  # the next arm may take it; if none does, the message names the whole union
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if tp is Any:
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be {one_of(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arm,) = typing.get_args(tp)
        return [_check_type(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """``cls`` built from ``data``; every unknown key and every value of the wrong type in one ConfigError."""
    obj, errors = build(cls, data, prefix)
    if errors:
        raise ConfigError(problems_message(errors))
    return obj


def build(cls: type, data: Any, prefix: str = "") -> tuple[Any, list[str]]:
    """``cls`` built from ``data``, and every problem found on the way: each unknown key (with the closest valid
    one), each value of the wrong type, each problem the class's own check raises. A field with a problem keeps its
    default, so the later checks of the other fields still run and one message can list everything."""
    if not isinstance(data, dict):
        return cls(), [f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}"]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs, errors = {}, []
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            errors.append(f"unknown config key '{prefix}{key}'{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key], inner = build(tp, value, f"{prefix}{key}.")
            errors += inner
            continue
        try:
            kwargs[key] = _check_type(value, tp, f"{prefix}{key}")
        except ConfigError as e:
            errors.append(str(e))
    try:
        return cls(**kwargs), errors
    except ConfigError as e:  # the class's own check (ModelConfig.__post_init__): its message, then the defaults
        return cls(), [*errors, str(e)]


def problems_message(errors: list[str]) -> str:
    """One message for the problems of a config: the problem itself, or a count and one per line."""
    if len(errors) == 1:
        return errors[0]
    return f"{len(errors)} config problems:\n  " + "\n  ".join(errors)


def one_of(values: typing.Sequence[Any]) -> str:
    """'a', 'b' or 'c': the allowed values as messages name them (booleans as YAML writes them: true, false)."""
    shown = [str(v).lower() if isinstance(v, bool) else repr(v) for v in values]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"


def choices(tp: Any) -> tuple:
    """The allowed values of a Literal type (also inside ``X | Literal[...]``), e.g. for argparse choices."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(v for arm in typing.get_args(tp) for v in choices(arm))
    return ()


def field_choices(cls: type, name: str) -> tuple:
    """The allowed values of the Literal field ``name`` of dataclass ``cls``."""
    return choices(typing.get_type_hints(cls)[name])


def literal_errors(obj: Any, prefix: str = "") -> list[str]:
    """One message per Literal field of dataclass ``obj`` whose value is not allowed (also after assignment)."""
    errors = []
    for name, tp in typing.get_type_hints(type(obj)).items():
        allowed = choices(tp)
        value = getattr(obj, name)
        if allowed and value not in allowed and not _other_arm(tp, value):
            errors.append(f"{prefix}{name} must be {one_of(allowed)}, got {value!r}")
        items = choices(typing.get_args(tp)[0]) if typing.get_origin(tp) is list else ()
        if items and isinstance(value, list | tuple):  # list[Literal[...]]: each item
            errors += [f"{prefix}{name} items must be {one_of(items)}, got {v!r}" for v in value if v not in items]
    return errors


def _other_arm(tp: Any, value: Any) -> bool:
    # X | Literal[...] also admits any value of its non-Literal arms (e.g. bool | Literal["last"])
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return False
    for arm in typing.get_args(tp):
        if typing.get_origin(arm) is typing.Literal:
            continue
        try:
            _check_type(value, arm, "")
            return True
        except ConfigError:
            pass
    return False


# ----------------------------------------------------------------------------- describing fields (configs --keys)


def describe_type(tp: Any) -> str:
    """A field's type as a config file sees it: int, float, str, bool, list[float], mapping, ``X or null``,
    and for a Literal its values (``fp32 | bf16 | fp16``)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(show_value(v) for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        arms = [describe_type(a) for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(arms) + (" | null" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        return f"list[{describe_type(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "mapping"
    return "any" if tp is Any else getattr(tp, "__name__", str(tp))


def show_value(value: Any) -> str:
    """A value as YAML writes it in a config file: true, null, 0.009, [0.5, 1.0], a bare string."""
    return value if isinstance(value, str) else json.dumps(value)


def field_comments(cls: type) -> dict[str, str]:
    """The comment after each field of dataclass ``cls`` in its source (``name: int = 8  # why``): the reason
    every field carries. A comment continued on the next line (a comment line starting in lower case) is joined;
    a comment line starting in upper case heads the fields below it and is left out."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (a frozen build): no reasons
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    last = None
    for line in lines:
        match = re.match(r"\s+(\w+): [^#]*?(?:#\s*(.*))?$", line)
        if match and match.group(1) in names:
            last = match.group(1)
            comments[last] = (match.group(2) or "").strip()
        elif last and re.match(r"\s+#\s*[a-z]", line) and comments[last]:
            comments[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return comments


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_utf8(path: str | Path, error: Callable[[str], Exception]) -> str:
    """The text of a file users write (a config, a class list), which must be UTF-8; a UTF-8 byte-order mark is
    dropped. Other bytes raise ``error(reason)``, the reason giving the byte and its offset in the file."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 1].hex()
        # Notepad and PowerShell write UTF-16 with a byte-order mark; Latin-1 and cp1252 fail on a later byte
        guess = " (it starts with a UTF-16 byte-order mark: a UTF-16 file)" if data.startswith(_UTF16_BOMS) else ""
        raise error(
            f"not UTF-8 text: byte 0x{bad} at offset {e.start} cannot be decoded{guess}; UTF-8 is expected "
            "(save the file as UTF-8)"
        ) from None
