"""Checkpoint files: plain dicts loaded with weights_only=True, written atomically, read with fallback.

A save writes a temporary file in the target folder, fsyncs it, renames it over the target (atomic on
POSIX) and only then moves the "latest" pointer, so a crash mid-save never leaves a half-written
checkpoint behind the pointer. The last k checkpoints are kept. When the newest checkpoint of a run folder
is damaged anyway (truncated copy, disk error, not a zip, keys missing), loading reports it and falls back
to the next older one.

A training checkpoint (format 2) holds: model, optimizer, scaler, schedule, iteration, rng (one state per
rank), data (epoch and batches consumed), config (resolved), skipped_steps, replicas (per-rank digests);
newer ones also loss (of the step that wrote it), param_norm, class_names and palette (absent: unknown).
A failed write (disk full, read-only) is a CheckpointWriteError naming the file and the OS reason.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 2  # 1: model/optimizer/scaler/iteration/config and rank 0's torch RNG only
LATEST = "latest.txt"
MODEL_KEYS = ("model",)
RESUME_KEYS = ("model", "optimizer", "iteration")

Log = Callable[[str], None]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only, quota); the previous one is untouched."""


class _Writes:
    """A binary file that remembers the OSError of a failed write: torch.save reports a failed write only as
    ``RuntimeError: ... unexpected pos``, without the OS reason."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file, fsync, rename over ``path``; CheckpointWriteError (an OSError naming
    ``path`` and the OS reason) if any step fails, with the temporary removed and ``path`` unchanged."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointWriteError(e.errno, f"cannot write a checkpoint: {e.strerror}", str(path)) from None
    f = _Writes(os.fdopen(fd, "wb"))
    try:
        try:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.f.close()
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = f.error or (e if isinstance(e, OSError) else None)
        if cause is not None:
            raise CheckpointWriteError(
                cause.errno, f"cannot write a checkpoint: {cause.strerror or cause}", str(path)
            ) from None
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(e.errno, f"cannot write: {e.strerror}", str(path)) from None


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


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, required: Sequence[str] = MODEL_KEYS, mmap=False
) -> dict[str, Any]:
    """Read a checkpoint; ValueError naming the file when it is damaged, foreign or lacks ``required`` keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(
            f"{path}: not an emanet checkpoint (expected a dict with 'model'); "
            "convert checkpoints from other code bases with `emanet convert`"
        )
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: damaged or incomplete checkpoint, missing {missing}")
    version = int(ckpt.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version} is newer than this emanet reads ({FORMAT_VERSION})")
    return ckpt


def _iteration(path: Path) -> int:
    m = re.fullmatch(r"iter_(\d+)\.pt", path.name)
    return int(m.group(1)) if m else -1


def checkpoint_candidates(folder: str | Path) -> list[Path]:
    """Checkpoints of a run folder, most preferred first: latest.txt's target, then newest to oldest."""
    folder = Path(folder)
    found = sorted(folder.glob("iter_*.pt"), key=_iteration, reverse=True)
    pointer = folder / LATEST
    if pointer.is_file():
        target = folder / pointer.read_text().strip()
        if target in found:
            found.remove(target)
            found.insert(0, target)
    return found


def _report(message: str, log: Log | None) -> None:
    if log is not None:
        log(message)
    else:
        warnings.warn(message, stacklevel=3)


def load_latest_checkpoint(
    folder: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    required: Sequence[str] = MODEL_KEYS,
    log: Log | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of ``folder`` that loads and has ``required`` keys, or None if there is none.

    Each damaged newer one is reported (``log``, else a warning) and skipped.
    """
    for path in checkpoint_candidates(folder):
        try:
            return path, load_checkpoint(path, map_location, required=required)
        except (ValueError, OSError) as e:
            _report(f"skipping damaged checkpoint: {e}; trying an older one", log)
    return None


def latest_checkpoint(folder: str | Path, *, log: Log | None = None) -> Path | None:
    """The newest readable checkpoint in a run folder, or None.

    Damaged newer files are reported and skipped. The check reads the file's index and pickled structure
    memory-mapped, so it costs little even for large checkpoints.
    """
    for path in checkpoint_candidates(folder):
        try:
            load_checkpoint(path, required=MODEL_KEYS, mmap=True)
            return path
        except (ValueError, OSError) as e:
            _report(f"skipping damaged checkpoint: {e}; trying an older one", log)
    return None


def parameter_norm(state: dict[str, torch.Tensor]) -> float:
    """L2 norm over the floating-point entries of a state dict (inf/nan when any entry is)."""
    total = 0.0
    for v in state.values():
        if v.is_floating_point():
            total += float(v.double().pow(2).sum())
    return math.sqrt(total) if math.isfinite(total) else total


def kept_checkpoints(folder: str | Path) -> list[dict[str, Any]]:
    """The checkpoints of a run folder, oldest first: path, iteration, the loss of the step that wrote it
    (None if unknown), the parameter norm and whether every weight is finite; damaged files get ``error``."""
    out = []
    for path in sorted(Path(folder).glob("iter_*.pt"), key=_iteration):
        try:
            ckpt = load_checkpoint(path, mmap=True)
        except (ValueError, OSError) as e:
            out.append({"path": path, "iteration": _iteration(path), "error": str(e)})
            continue
        norm = ckpt.get("param_norm")
        if norm is None:
            norm = parameter_norm(ckpt["model"])
        out.append(
            {
                "path": path,
                "iteration": int(ckpt.get("iteration", _iteration(path))),
                "loss": ckpt.get("loss"),
                "param_norm": float(norm),
                "finite": math.isfinite(norm),
            }
        )
    return out


# ----------------------------------------------------------------------------- training state


def training_state(
    *,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scaler: dict[str, Any],
    iteration: int,
    config: dict[str, Any],
    schedule: dict[str, Any],
    rng: list[dict[str, Any]],
    data: dict[str, int],
    skipped_steps: int,
    replicas: list[dict[str, str]],
    loss: float | None,
    class_names: list[str],
    palette: list[list[int]],
) -> dict[str, Any]:
    """A format-2 training checkpoint (see the module docstring) from its parts; ``save_checkpoint`` writes it."""
    return {
        "model": model,
        "optimizer": optimizer,
        "scaler": scaler,
        "iteration": iteration,
        "config": config,
        "schedule": schedule,
        "rng": rng,
        "data": data,
        "skipped_steps": skipped_steps,
        "replicas": replicas,
        "world_size": len(rng),
        "loss": loss,
        "param_norm": parameter_norm(model),
        "class_names": class_names,
        "palette": palette,
    }


def restore_training_state(
    ckpt: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    batch_size: int,
    accum_steps: int,
    world_size: int,
    rank: int,
) -> tuple[int, int, tuple[int, int], dict[str, Any] | None, bool]:
    """Load a training checkpoint into model, optimizer and scaler.

    Returns (iteration, skipped steps, (epoch, batches) to continue the data from, this rank's RNG state or
    None, exact): exact is False when the checkpoint was written with another batch size, process count or
    format 1, and the run then continues from the same iteration but not bitwise as an uninterrupted one.
    """
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    start = int(ckpt["iteration"])
    exact, rng = True, ckpt.get("rng")
    data = ckpt.get("data")
    if data is None:  # format 1: only the iteration is known
        exact, position = False, (0, start * accum_steps)
    elif data["batch_size"] != batch_size or data["world_size"] != world_size:
        exact = False
        samples = data["batches"] * data["batch_size"] * data["world_size"]
        position = (data["epoch"], samples // (batch_size * world_size))
    else:
        position = (data["epoch"], data["batches"])
    own = None
    if isinstance(rng, list) and len(rng) == world_size:
        own = rng[rank]
    else:
        exact = False
        if isinstance(rng, dict) and "torch" in rng:  # format 1: rank 0's torch generator
            torch.set_rng_state(rng["torch"])
    return start, int(ckpt.get("skipped_steps", 0)), position, own, exact
