"""Checkpoint files: plain dicts loaded with weights_only=True, written atomically, read with fallback.

A save writes a temporary file in the target folder, fsyncs it, renames it over the target (atomic on
POSIX) and only then moves the "latest" pointer, so a crash mid-save never leaves a half-written
checkpoint behind the pointer. The last k checkpoints are kept. When the newest checkpoint of a run folder
is damaged anyway (truncated copy, disk error, not a zip, keys missing), loading skips it, falls back to the
next older one and returns the skipped files (``DamagedCheckpoint``) for the caller to report.

A training checkpoint (format 2) is a ``TrainingState``; older format-2 files lack ``scheduler`` (the
schedule then resumes at their iteration) and may lack loss, param_norm, class_names and palette (unknown).
A failed write (disk full, read-only) is a CheckpointWriteError naming the file and the OS reason.
This module names the checkpoint files of a run folder (``iter_*.pt``, latest.txt) and holds the one way
emanet writes a file (``atomic_path``, ``write_text_atomic``, ``write_bytes_atomic``): the run folder's other
files, and every user-facing output (exports, eval JSON, predictions, plots, reports, model folders) use it;
``claim_folder`` makes an output folder and proves it writable before a command's work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emanet.errors import ModelSourceError

FORMAT_VERSION = 2
LATEST = "latest.txt"  # the name of the newest checkpoint, written after it
CHECKPOINTS = "iter_*.pt"  # glob of a run folder's checkpoints; checkpoint_name gives one
MODEL_KEYS = ("model",)
RESUME_KEYS = ("model", "optimizer", "iteration")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}.pt"


def checkpoint_iteration(path: str | Path) -> int:
    """The iteration in a checkpoint's file name, -1 for any other name."""
    m = re.fullmatch(r"iter_(\d+)\.pt", Path(path).name)
    return int(m.group(1)) if m else -1


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


# ----------------------------------------------------------------------------- writing any file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_STOP_SIGNALS = [getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n)]


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the few instructions between creating a file and holding its name (where an
    interrupt would leave it behind): a signal that arrives meanwhile is noted and raised again, to the handler
    that was installed, when the block ends. Python runs signal handlers in the main thread only, whichever
    thread the signal reached (so a thread's signal mask would not do); elsewhere nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    handlers = {}
    try:
        for s in _STOP_SIGNALS:
            handlers[s] = signal.signal(s, lambda signum, frame: caught.append(signum))
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for signum in caught:
            signal.raise_signal(signum)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` for a writer to fill (PIL, matplotlib, torch.onnx, safetensors, open):
    when the block ends it is fsynced and renamed over ``path``, so a reader sees the old file or the new one,
    never a torn one. On any failure (disk full, read-only folder, Ctrl-C) the temporary is removed and
    ``path`` keeps what it held; an OSError is raised again naming ``path`` (the CLI prints "PATH: reason").

    The temporary keeps ``path``'s extension (``.NAME.<random>.tmp.png``): writers that pick the format from
    the name still see it.
    """
    path = Path(path)
    stem = path.name if len(path.name.encode()) <= 200 else path.name[:100]  # a name near 255 bytes still fits
    tmp: Path | None = None
    try:
        with _signals_held():  # a Ctrl-C or SIGTERM lands after the temporary is made and known, never between
            fd, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
            tmp = Path(name)
        os.close(fd)
        os.chmod(name, 0o666 & ~_umask())  # an ordinary file's mode, not mkstemp's 0600
    except BaseException as e:  # an interrupt or a failure before the writer starts: no temporary is left
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, str(tmp), name):  # another file's error keeps its name
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def claim_folder(folder: str | Path) -> Path:
    """An output folder, created with its parents and proven writable (a probe file made and removed) before
    any work; an OSError names the folder and the reason."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".emanet-probe-"):
            pass
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(folder)) from None
    return folder


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``atomic_path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_checkpoint(state: dict[str, Any], folder: str | Path, iteration: int, keep: int = 3) -> Path:
    """Write ``checkpoint_name(iteration)`` in ``folder``, point latest.txt at it, keep the newest ``keep``."""
    folder = Path(folder)
    path = folder / checkpoint_name(iteration)
    atomic_torch_save({"format_version": FORMAT_VERSION, **state}, path)
    try:
        write_text_atomic(folder / LATEST, path.name + "\n")
    except OSError as e:
        raise CheckpointWriteError(e.errno, f"cannot write: {e.strerror}", e.filename) from None
    if keep > 0:
        for old in sorted(folder.glob(CHECKPOINTS), key=checkpoint_iteration)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, required: Sequence[str] = MODEL_KEYS, mmap=False
) -> dict[str, Any]:
    """Read a checkpoint; ModelSourceError naming the file when it is damaged, foreign or lacks ``required``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated or foreign files
        raise ModelSourceError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ModelSourceError(
            f"{path}: not an emanet checkpoint (expected a dict with 'model'); "
            "convert checkpoints from other code bases with `emanet convert`"
        )
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ModelSourceError(f"{path}: damaged or incomplete checkpoint, missing {missing}")
    version = int(ckpt.get("format_version", FORMAT_VERSION))
    if version > FORMAT_VERSION:
        raise ModelSourceError(
            f"{path}: checkpoint format {version} is newer than this emanet reads ({FORMAT_VERSION})"
        )
    return ckpt


def checkpoint_candidates(folder: str | Path) -> list[Path]:
    """Checkpoints of a run folder, most preferred first: latest.txt's target, then newest to oldest."""
    folder = Path(folder)
    found = sorted(folder.glob(CHECKPOINTS), key=checkpoint_iteration, reverse=True)
    pointer = folder / LATEST
    if pointer.is_file():
        target = folder / pointer.read_text().strip()
        if target in found:
            found.remove(target)
            found.insert(0, target)
    return found


@dataclass(frozen=True)
class DamagedCheckpoint:
    path: Path
    error: str  # why it did not load (the message names the file)


@dataclass
class LatestCheckpoint:
    """The newest checkpoint of a run folder that loads, and the newer ones skipped on the way."""

    path: Path | None  # None: no checkpoint of the folder loads
    damaged: list[DamagedCheckpoint] = field(default_factory=list)  # newest first
    checkpoint: dict[str, Any] | None = None  # its contents (load_latest_checkpoint only)


def load_latest_checkpoint(
    folder: str | Path, map_location: str | torch.device = "cpu", *, required: Sequence[str] = MODEL_KEYS
) -> LatestCheckpoint:
    """The newest checkpoint of ``folder`` that loads and has ``required`` keys, read."""
    damaged = []
    for path in checkpoint_candidates(folder):
        try:
            return LatestCheckpoint(path, damaged, load_checkpoint(path, map_location, required=required))
        except (ValueError, OSError) as e:
            damaged.append(DamagedCheckpoint(path, str(e)))
    return LatestCheckpoint(None, damaged)


def latest_checkpoint(folder: str | Path) -> LatestCheckpoint:
    """The newest readable checkpoint of a run folder, not kept in memory.

    The check reads the file's index and pickled structure memory-mapped, so it costs little even for large
    checkpoints.
    """
    damaged = []
    for path in checkpoint_candidates(folder):
        try:
            load_checkpoint(path, required=MODEL_KEYS, mmap=True)
            return LatestCheckpoint(path, damaged)
        except (ValueError, OSError) as e:
            damaged.append(DamagedCheckpoint(path, str(e)))
    return LatestCheckpoint(None, damaged)


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
    for path in sorted(Path(folder).glob(CHECKPOINTS), key=checkpoint_iteration):
        try:
            ckpt = load_checkpoint(path, mmap=True)
        except (ValueError, OSError) as e:
            out.append({"path": path, "iteration": checkpoint_iteration(path), "error": str(e)})
            continue
        norm = ckpt.get("param_norm")
        if norm is None:
            norm = parameter_norm(ckpt["model"])
        out.append(
            {
                "path": path,
                "iteration": int(ckpt.get("iteration", checkpoint_iteration(path))),
                "loss": ckpt.get("loss"),
                "param_norm": float(norm),
                "finite": math.isfinite(norm),
            }
        )
    return out


# ----------------------------------------------------------------------------- training state


@dataclass
class TrainingState:
    """A training checkpoint (format 2): what a run needs to continue exactly, in types that
    ``torch.load(weights_only=True)`` reads back."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]  # the learning-rate schedule's state_dict (its position)
    scaler: dict[str, Any]
    iteration: int
    config: dict[str, Any]  # resolved
    rng: list[dict[str, Any]]  # one state per rank, in rank order
    data: dict[str, int]  # epoch and batches consumed, with the batch size and process count they count in
    skipped_steps: int
    replicas: list[dict[str, str]]  # per-rank digests of the replica
    loss: float | None  # of the step that wrote it; None: non-finite
    class_names: list[str]
    palette: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        """The plain dict ``save_checkpoint`` writes, with world_size and the parameter norm."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # asdict would copy tensors
        return {**state, "world_size": len(self.rng), "param_norm": parameter_norm(self.model)}


@dataclass
class Resumed:
    """Where a run continues from a training checkpoint (``restore_training_state``)."""

    iteration: int
    skipped_steps: int
    position: tuple[int, int]  # (epoch, batches consumed in it)
    rng: dict[str, Any] | None  # this rank's RNG state; None: the checkpoint has another process count
    scheduler: dict[str, Any]  # the learning-rate schedule's state_dict
    exact: bool  # False: another batch size or process count; the run then does not repeat bitwise


def restore_training_state(
    ckpt: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    batch_size: int,
    world_size: int,
    rank: int,
) -> Resumed:
    """Load a training checkpoint into model, optimizer and scaler; the rest is returned for the run to take.

    With another batch size or process count the data continue from the same sample and the RNG states are
    not restored (``exact`` False).
    """
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    data, rngs = ckpt["data"], ckpt["rng"]
    exact = data["batch_size"] == batch_size and data["world_size"] == world_size and len(rngs) == world_size
    if data["batch_size"] == batch_size and data["world_size"] == world_size:
        position = (data["epoch"], data["batches"])
    else:
        samples = data["batches"] * data["batch_size"] * data["world_size"]
        position = (data["epoch"], samples // (batch_size * world_size))
    return Resumed(
        iteration=int(ckpt["iteration"]),
        skipped_steps=int(ckpt["skipped_steps"]),
        position=position,
        rng=rngs[rank] if len(rngs) == world_size else None,
        scheduler=ckpt.get("scheduler") or {"last_epoch": int(ckpt["iteration"])},  # older files: at their iteration
        exact=exact,
    )
