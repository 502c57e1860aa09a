"""The one user-error type: a mistake the user can fix (a config, a run folder, data, a model source).

The command line prints a UserError's message without a traceback and exits with status 2; anything else
(torch's own ValueError included) is a bug and keeps its traceback. UserError subclasses ValueError, so code
that already catches ValueError for a bad value still catches it.
"""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """Something the user gave is wrong; the message names it (the file, the key, the flag) and says how to fix it."""


class ConfigError(UserError):
    """A config file, a ``section.key=value`` override or a command-line value."""


class RunFolderError(UserError):
    """A run folder that cannot be used as asked (in use, holding another run, a resume it cannot take)."""


class DataError(UserError):
    """A dataset that is missing, incomplete or holds a file that cannot be read: ``path`` names the file,
    ``reason`` says what is wrong, ``kind`` is a key of ``emanet.data.KINDS`` and ``details`` holds figures
    (bad values and counts, sizes) for reports.

    ``str(e)`` is ``"path: reason"``. One argument (``DataError(message)``) is accepted too, so that
    DataLoader workers can re-raise it in the main process as a ``DataError`` with the full message.
    """

    def __init__(self, path: str | Path, reason: str | None = None, *, kind: str = "unreadable", details=None):
        if reason is None:
            path, reason = _from_worker(str(path))
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        self.details = dict(details or {})

    def __reduce__(self):  # keep kind and details through pickling (multiprocessing)
        return type(self), (self.path, self.reason), {"kind": self.kind, "details": self.details}


def _from_worker(message: str) -> tuple[str, str]:
    """Split a one-argument message into (path, reason). DataLoader re-raises a worker's error as
    ``DataError("Caught DataError in DataLoader worker process N.\\nOriginal Traceback ...")``: keep the
    original last line ("path: reason") and say where it came from, without the traceback text."""
    lines = message.strip().splitlines()
    if len(lines) < 2 or "Original Traceback" not in message or "DataError: " not in lines[-1]:
        return "", message
    path, _, reason = lines[-1].split("DataError: ", 1)[1].partition(": ")
    where = lines[0].removeprefix("Caught DataError in ").rstrip(".")
    if not reason or not Path(path).exists():
        return "", f"{path}: {reason} (in {where})" if reason else f"{path} (in {where})"
    return path, f"{reason} (in {where})"


class ModelSourceError(UserError):
    """A model folder, checkpoint, run folder or Hub repo that cannot be loaded or converted as asked."""


class MissingExtra(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def install_hint(extra: str) -> str:
    """How to install an optional extra, from the package index and from a checkout (one wording for every
    message that names an extra): ``pip install 'emanet[onnx]'`` or ``pip install -e '.[onnx]'``."""
    return f"pip install 'emanet[{extra}]' (from a checkout: pip install -e '.[{extra}]')"
