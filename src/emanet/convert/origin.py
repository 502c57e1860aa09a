"""Where a converted model came from, and what its file did not say: config.json's "origin" entry (the file,
the toolkit, the mmseg config name, the settings read, assumed and given), the warning that names every
setting an mmseg checkpoint without config text left to our defaults, and the refusal to guess a test
pipeline that the config name shows to be another one. Used by checkpoints.py; docs/convert.md explains.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emanet.config import Config
from emanet.convert.mmseg_config import config_name, implied_by_name, override_text
from emanet.errors import ModelSourceError

__all__ = ["DATASETS_BY_CLASSES", "MMSEG_UNREAD", "TOOLKITS", "conversion_origin"]

logger = logging.getLogger(__name__)

DATASETS_BY_CLASSES = {21: "voc", 19: "cityscapes", 150: "ade20k"}
TOOLKITS = {"reference": "the authors' code (XiaLiPKU/EMANet)", "mmseg": "mmsegmentation"}

# Settings an mmseg config text gives and the weights do not (config key, in words): without the text, each
# keeps our mmseg default (MODEL_SETTINGS, DATA_SETTINGS, EvalConfig), which the conversion says it assumed.
MMSEG_UNREAD = (
    ("model.align_corners", "align_corners"),
    ("eval.mode", "test mode (whole / slide)"),
    ("data.eval_resize", "test Resize"),
    ("model.output_stride", "output stride"),
    ("model.num_stages", "EM stages"),
    ("model.momentum", "bases momentum"),
    ("model.dropout", "dropout"),
    ("data.mean", "mean"),
    ("data.std", "std"),
)
# the reference's settings.py values that no checkpoint records
REFERENCE_UNREAD = (("model.output_stride", "settings.STRIDE"), ("model.num_stages", "settings.STAGE_NUM"))


def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def conversion_origin(
    cfg: Config,
    source: str,
    file: str,
    meta: Mapping[str, Any],
    found: Mapping[str, Any],
    overrides: Sequence[str],
    assume_defaults: bool,
) -> dict[str, Any]:
    """Where the model came from (config.json's "origin", shown by the model card): the file, the toolkit, the
    config name, the settings read from its config text, those assumed, the overrides. An mmseg checkpoint
    without config text is refused when its name implies settings our defaults do not give (``_refuse_guess``),
    and otherwise converts with a warning naming every setting assumed."""
    given = {o.split("=", 1)[0].strip() for o in overrides}
    config = config_name(meta, Path(file).name) if source == "mmseg" else None
    unread = MMSEG_UNREAD if source == "mmseg" and not found["config_text"] else ()
    if source == "reference":
        unread = REFERENCE_UNREAD
    keys = [k for k, _ in unread if k not in given]
    if cfg.eval.mode == "slide" and unread is MMSEG_UNREAD:
        keys += [k for k in ("eval.crop_size", "eval.stride") if k not in given]
    assumed = [override_text(k, _value(cfg, k)) for k in keys]
    n = cfg.model.num_classes
    dataset = cfg.data.dataset if "data.dataset" in given else DATASETS_BY_CLASSES.get(n)
    if dataset is None:
        assumed.append(f"data.dataset={cfg.data.dataset} (the config default: {n} classes match no known dataset)")
    elif unread is MMSEG_UNREAD and "data.dataset" not in given:
        assumed.append(f"data.dataset={dataset} (from {n} classes)")
    if unread is MMSEG_UNREAD:
        implied, open_keys, evidence = implied_by_name(config or "")
        _refuse_guess(cfg, file, config, implied, open_keys, evidence, given, assume_defaults)
        words = ", ".join(w for _, w in MMSEG_UNREAD)
        said = f"; its name ({config}) says {evidence}, and --assume-defaults kept the defaults" if evidence else ""
        logger.warning(
            f"{file} carries no mmseg config text (meta 'config' / 'cfg'): could not read its {words}; "
            f"assumed {', '.join(assumed)}{said}"
            + (f"; from your overrides: {', '.join(overrides)}" if overrides else "")
        )
    return {
        "kind": "converted",
        "file": Path(file).name,
        "toolkit": TOOLKITS[source],
        "config": config,
        "config_text": bool(found["config_text"]),
        "read": list(found["read"]),
        "assumed": assumed,
        "overrides": list(overrides),
        "dataset": dataset,
    }


def _refuse_guess(
    cfg: Config,
    file: str,
    config: str | None,
    implied: Mapping[str, Any],
    open_keys: Sequence[str],
    evidence: str,
    given: set[str],
    assume_defaults: bool,
) -> None:
    """Refuse (ModelSourceError) to guess the test pipeline of an mmseg model without config text whose name
    implies settings other than our defaults, unless the overrides give them or ``assume_defaults``."""
    missing = [k for k, v in implied.items() if k not in given and _value(cfg, k) != v]
    missing += [k for k in open_keys if k not in given]
    if not missing or assume_defaults:
        return
    if open_keys:
        what = (
            f"the test pipeline of an mmseg model trained on these crops is not one of the published EMANet "
            f"configs'; pass {', '.join(missing)} (eval.mode=slide also needs eval.crop_size and eval.stride; "
            "data.eval_resize=null for none)"
        )
    else:
        wanted = " ".join(override_text(k, v) for k, v in implied.items())
        lacking = f" (yours lack {', '.join(missing)})" if given & set(implied) else ""
        what = (
            f"mmseg's config for it tests with settings our mmseg defaults do not give; pass them as overrides: "
            f"{wanted}{lacking}"
        )
    raise ModelSourceError(
        f"{file} carries no mmseg config text and its name ({config}) says {evidence}: {what} (docs/convert.md "
        "lists them per published config), or --assume-defaults (assume_defaults=True) to convert with our mmseg "
        "defaults anyway"
    )
