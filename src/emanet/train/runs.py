"""Run folders: one training at a time, never two runs mixed, nothing silently dropped.

- ``RunLock``: an exclusive OS lock (``fcntl.lockf`` on ``.lock`` in the folder) for the life of a run. The
  kernel drops it when the process ends in any way, ``kill -9`` included, so a lock is never stale; a
  POSIX record lock is not inherited by forked DataLoader workers, which may outlive a killed trainer.
- ``prepare_run_folder``: refuses a fresh run into a folder that holds one (``--resume`` or ``--overwrite``;
  the overwrite moves the old run aside to ``<folder>.old-<time>``) and removes temporaries left by a save
  that was killed.
- ``config_differences``: what a resume may not change; ``RESUME_MAY_CHANGE`` is the one list of what it may.
- ``resume_point``: the checkpoint to resume from, its config compared before anything is written.
- ``cut_metrics``: on resume, metrics.jsonl lines after the resumed iteration move to metrics.cut.jsonl.
- ``describe_checkpoints``: after a diverged run, the kept checkpoints with their loss, suspect ones flagged.

The run folder's file names are defined here once (the checkpoints' and latest.txt in emanet.checkpoint).
Training calls these on rank 0 only; they report through this module's logger.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from emanet.checkpoint import (
    CHECKPOINTS,
    LATEST,
    RESUME_KEYS,
    checkpoint_iteration,
    load_checkpoint,
    load_latest_checkpoint,
    write_text_atomic,
)
from emanet.errors import RunFolderError

logger = logging.getLogger(__name__)

LOCK = ".lock"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
METRICS_CUT = "metrics.cut.jsonl"  # lines cut from metrics.jsonl on resume, oldest first
CLASSES = "classes.json"  # class names and palette of the training data
EVAL = "eval.json"  # the final evaluation and the run's summary
BAD_SAMPLES = "bad_samples.txt"  # training files skipped with data.on_bad_sample=skip
# files whose presence means a folder holds a run (checkpoints are matched by pattern)
RUN_FILES = (CONFIG, METRICS, LATEST, EVAL, CLASSES, BAD_SAMPLES)
# what the run itself owns: never the target of another command's --out (eval.json may be, with --overwrite)
RESERVED = (CONFIG, METRICS, METRICS_CUT, LATEST, CLASSES, BAD_SAMPLES, LOCK)
# temporaries of checkpoint.atomic_torch_save / atomic_path (.NAME.<random>.tmp.EXT; older releases .NAME.tmp)
STALE_TEMPORARY = re.compile(
    r"\.(iter_\d+\.pt|latest\.txt|metrics(\.cut)?\.jsonl|classes\.json|config\.yaml)(\.\w+)?\.tmp(\.\w+)?"
)

# Keys a resume may change: how long and where the run goes on, how often it logs, evaluates and saves,
# the learning rate (the advice after a diverged run) and evaluation-only settings. Everything else
# (model, data and augmentation, loss, seed, normalisation) must match the checkpoint's config.
RESUME_MAY_CHANGE = (
    "train.iterations",
    "train.log_interval",
    "train.eval_interval",
    "train.checkpoint_interval",
    "train.keep_checkpoints",
    "train.max_eval_images",
    "train.device",
    "train.precision",
    "train.deterministic",
    "train.out_dir",
    "train.on_nonfinite",
    "train.max_consecutive_skips",
    "train.batch_size",  # the engine resumes at the same sample and says the run is no longer exact
    "train.accum_steps",
    "train.loggers",  # where the scalars also go: absent from runs saved before it existed
    "optim.lr",
    "optim.warmup_iters",
    "data.root",  # the same dataset, moved
    "data.num_workers",
    "data.on_bad_sample",
    "model.pretrained_backbone",  # the checkpoint's weights replace it
    "model.eval_stages",
    "eval",  # a whole section: evaluation only
)


def os_reason(error: OSError) -> str:
    """'PATH: reason' for a failed file operation."""
    where = error.filename if error.filename is not None else "?"
    return f"{where}: {error.strerror or error}"


# ----------------------------------------------------------------------------- lock


_HELD: set[str] = set()  # folders locked by this process (POSIX locks do not conflict within one process)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists here (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock on a run folder; ``with RunLock(folder):`` or ``acquire()`` / ``release()``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            text = self.path.read_text().split()
        except OSError:
            return "another process"
        if text and text[0].isdigit():
            pid = int(text[0])
            host = f" on {text[1]}" if len(text) > 1 else ""
            return f"PID {pid}{host}" + ("" if pid_alive(pid) else " (no longer running here)")
        return "another process"

    def acquire(self) -> RunLock:
        key = str(self.folder.resolve())
        if key in _HELD:
            raise RunFolderError(f"{self.folder} is in use by another training in this process")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RunFolderError(
                f"{self.folder} is in use by another training ({self._holder()} holds "
                f"{self.path}); wait for it to end, or choose another train.out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())
        self._fd = fd
        _HELD.add(key)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        _HELD.discard(str(self.folder.resolve()))
        with contextlib.suppress(OSError):  # the folder may be gone; the lock ends with the descriptor
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the lock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ----------------------------------------------------------------------------- refuse / overwrite / clean


def run_contents(folder: Path) -> list[str]:
    """The run files a folder holds (empty: no run there)."""
    if not folder.is_dir():
        return []
    found = [name for name in RUN_FILES if (folder / name).exists()]
    return found + sorted(p.name for p in folder.glob(CHECKPOINTS))


def move_aside(folder: Path) -> Path:
    """Move everything in ``folder`` but its lock to ``<folder>.old-<time>``; returns that folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
    target.mkdir()
    for entry in sorted(folder.iterdir()):
        if entry.name != LOCK:
            entry.rename(target / entry.name)
    return target


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Delete the temporaries that an interrupted save leaves (only under the run's lock)."""
    removed = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and STALE_TEMPORARY.fullmatch(entry.name):
            entry.unlink()
            removed.append(entry.name)
    return removed


def prepare_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Create and lock ``folder`` for a run; returns the held lock (release it when the run ends).

    A fresh run (``resume`` false) into a folder holding a run is refused unless ``overwrite``, which moves
    the old run aside first. Stale temporaries are removed either way.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = RunLock(folder).acquire()
    except OSError as e:
        raise RunFolderError(f"cannot use the run folder {folder} (train.out_dir): {os_reason(e)}") from None
    try:
        held = run_contents(folder)
        if held and not resume:
            if not overwrite:
                shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
                raise RunFolderError(
                    f"{folder} already holds a run ({shown}); continue it with --resume, start "
                    "over with --overwrite (the old run is moved aside to "
                    f"{folder.name}.old-<time>), or choose another train.out_dir"
                )
            logger.info("--overwrite: the earlier run in %s moved to %s", folder, move_aside(folder))
        removed = remove_stale_temporaries(folder)
        if removed:
            logger.info(
                "removed %d temporary file(s) left by an interrupted save: %s", len(removed), ", ".join(removed)
            )
    except OSError as e:
        lock.release()
        raise RunFolderError(f"cannot prepare the run folder {folder}: {os_reason(e)}") from None
    except BaseException:
        lock.release()
        raise
    return lock


def supersede_checkpoints(folder: Path, iteration: int, resumed: str | None) -> Path | None:
    """Move checkpoints newer than the resumed ``iteration`` to ``superseded-<time>/`` (the resumed run would
    overwrite them at the same iteration numbers) and point latest.txt at the resumed one."""
    newer = [p for p in folder.glob(CHECKPOINTS) if checkpoint_iteration(p) > iteration]
    target = None
    if newer:
        target = folder / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
        target.mkdir(exist_ok=True)
        for p in newer:
            p.rename(target / p.name)
    if resumed is not None:
        write_text_atomic(folder / LATEST, Path(resumed).name + "\n")
    return target


# ----------------------------------------------------------------------------- config compare


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "options":  # data.options compares as one value
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def may_change_on_resume(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key that differs and that a resume may not change."""
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if may_change_on_resume(key) or a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def resume_point(
    run: Path, resume_from: str | Path | None, config: dict[str, Any]
) -> tuple[Path, dict[str, Any]] | None:
    """(path, checkpoint) to resume from (``resume_from``, else the newest intact one), or None if the folder has
    none; RunFolderError if all are damaged or its config differs from ``config`` where a resume may not."""
    if resume_from is not None:
        path = Path(resume_from)
        if path.resolve().parent != run.resolve():
            raise RunFolderError(
                f"--resume-from {path}: not a checkpoint of the run folder {run} (train.out_dir); "
                f"set train.out_dir={path.parent} to continue that run"
            )
        try:
            found = (path, load_checkpoint(path, required=RESUME_KEYS))
        except (ValueError, FileNotFoundError) as e:
            raise RunFolderError(f"--resume-from: {e}") from None
    else:
        latest = load_latest_checkpoint(run, required=RESUME_KEYS)
        for damaged in latest.damaged:
            logger.warning("skipping damaged checkpoint: %s; trying an older one", damaged.error)
        if latest.path is None and latest.damaged:
            raise RunFolderError(
                f"--resume: no readable checkpoint in {run} ({len(latest.damaged)} damaged); start afresh with "
                "--overwrite (the folder, damaged checkpoints included, is moved aside)"
            )
        found = None if latest.path is None else (latest.path, latest.checkpoint)
    if found is None:
        return None
    saved = found[1].get("config")
    differences = config_differences(saved, config) if isinstance(saved, dict) else []
    if differences:
        raise RunFolderError(
            f"--resume: the config differs from the one {found[0]} was trained with, in "
            f"{len(differences)} key(s) a resume may not change:\n  "
            + "\n  ".join(differences)
            + "\nset them back, or start a new run (another train.out_dir, or --overwrite); "
            "a resume may change train.iterations, intervals, workers, device, optim.lr, "
            "eval.* (emanet.train.runs.RESUME_MAY_CHANGE)"
        )
    return found


# ----------------------------------------------------------------------------- metrics


def cut_metrics(folder: Path, iteration: int) -> int:
    """Keep metrics.jsonl up to ``iteration``; later (and unreadable) lines are appended to metrics.cut.jsonl
    after a marker line. Returns the number of lines cut."""
    path = folder / METRICS
    if not path.is_file():
        return 0
    keep, cut = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            later = int(record["iter"]) > iteration
        except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
            later = True
        (cut if later else keep).append(line)
    if not cut:
        return 0
    marker = {"kind": "cut", "resumed_at": iteration, "lines": len(cut), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(folder / METRICS_CUT, "a") as f:  # the side file first: a crash in between loses nothing
        f.write(json.dumps(marker) + "\n" + "\n".join(cut) + "\n")
        f.flush()
        os.fsync(f.fileno())
    write_text_atomic(path, "".join(line + "\n" for line in keep))
    return len(cut)


def logged_losses(folder: Path) -> dict[int, float | None]:
    """{iteration: training loss} from metrics.jsonl (None for a non-finite step)."""
    out: dict[int, float | None] = {}
    path = folder / METRICS
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("kind") == "train":
            out[int(record["iter"])] = record.get("loss")
    return out


def write_classes(folder: Path, class_names: list[str], palette: list) -> None:
    data = {"class_names": list(class_names), "palette": [list(map(int, c)) for c in palette]}
    write_text_atomic(folder / CLASSES, json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------- after a diverged run

SUSPECT_GROWTH = 10.0  # a parameter norm or loss this many times the oldest kept one's is suspect


def suspect_reasons(kept: list[dict[str, Any]], failed_at: int, losses: dict[int, float | None]) -> list[list[str]]:
    """For each of ``kept`` (checkpoint summaries, oldest first): why its weights may be damaged already.

    Suspect: non-finite weights; a parameter norm or a loss SUSPECT_GROWTH x the oldest kept checkpoint's;
    the step right after it (or a later logged step before the failure) had a non-finite loss.
    """
    good = [k for k in kept if "error" not in k and k["finite"]]
    base_norm = good[0]["param_norm"] if good else None
    finite_losses = [k["loss"] for k in good if isinstance(k.get("loss"), int | float) and math.isfinite(k["loss"])]
    base_loss = finite_losses[0] if finite_losses else None
    out = []
    for k in kept:
        reasons = []
        if "error" in k:
            reasons.append("unreadable")
        elif not k["finite"]:
            reasons.append("non-finite weights")
        else:
            if base_norm and k["param_norm"] > SUSPECT_GROWTH * base_norm:
                reasons.append(f"parameter norm {k['param_norm'] / base_norm:.3g}x the oldest kept checkpoint's")
            loss = k.get("loss")
            if base_loss and isinstance(loss, int | float) and loss > SUSPECT_GROWTH * base_loss:
                reasons.append(f"loss {loss / base_loss:.3g}x the oldest kept checkpoint's")
            later = [i for i, v in losses.items() if k["iteration"] < i < failed_at and v is None]
            if k["iteration"] == failed_at - 1 or later:
                reasons.append(f"the next step's loss was non-finite (iteration {min(later or [failed_at])})")
        out.append(reasons)
    return out


def describe_checkpoints(folder: Path, failed_at: int, kept: list[dict[str, Any]]) -> str:
    """Lines listing the kept checkpoints with their logged loss and norm, suspect ones flagged."""
    if not kept:
        return "no checkpoint kept in " + str(folder)
    reasons = suspect_reasons(kept, failed_at, logged_losses(folder))
    lines = ["kept checkpoints (loss of the step that wrote it, parameter norm):"]
    for k, why in zip(kept, reasons):
        if "error" in k:
            lines.append(f"  {k['path']}  unreadable: {k['error']}")
            continue
        loss = "?" if k.get("loss") is None else f"{k['loss']:.4g}"
        flag = f"  SUSPECT: {'; '.join(why)}" if why else ""
        lines.append(f"  {k['path']}  loss {loss}  norm {k['param_norm']:.4g}{flag}")
    return "\n".join(lines)
