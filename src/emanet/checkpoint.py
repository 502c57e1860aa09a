"""Checkpoint files: plain dicts loaded with weights_only=True, written atomically.

A save writes a temporary file in the target folder, fsyncs it, renames it over the target (atomic on
POSIX) and only then moves the "latest" pointer, so a crash mid-save never leaves a half-written
checkpoint behind the pointer. The last k checkpoints are kept.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
LATEST = "latest.txt"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(state: dict[str, Any], folder: str | Path, iteration: int, keep: int = 3) -> Path:
    """Write ``iter_{iteration:07d}.pt`` in ``folder``, point latest.txt at it, keep the newest ``keep``."""
    folder = Path(folder)
    path = folder / f"iter_{iteration:07d}.pt"
    atomic_torch_save({"format_version": FORMAT_VERSION, **state}, path)
    _write_text_atomic(folder / LATEST, path.name + "\n")
    if keep > 0:
        for old in sorted(folder.glob("iter_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not an emanet checkpoint (expected a dict with 'model'); "
                         "convert checkpoints from other code bases with `emanet convert`")  # fmt: skip
    return ckpt


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint in a run folder, or None."""
    folder = Path(folder)
    pointer = folder / LATEST
    if pointer.is_file():
        candidate = folder / pointer.read_text().strip()
        if candidate.is_file():
            return candidate
    found = sorted(folder.glob("iter_*.pt"))
    return found[-1] if found else None
