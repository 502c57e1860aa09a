"""The one user-error type: a mistake the user can fix (a config, a run folder, data, a model source).

The command line prints a UserError's message without a traceback and exits with status 2; anything else
(torch's own ValueError included) is a bug and keeps its traceback. UserError subclasses ValueError, so code
that already catches ValueError for a bad value still catches it.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave is wrong; the message names it (the file, the key, the flag) and says how to fix it."""


class ConfigError(UserError):
    """A config file, a ``section.key=value`` override or a command-line value."""


class RunFolderError(UserError):
    """A run folder that cannot be used as asked (in use, holding another run, a resume it cannot take)."""


class DataError(UserError):
    """A dataset that is missing, incomplete or holds a file that cannot be read."""


class ModelSourceError(UserError):
    """A model folder, checkpoint, run folder or Hub repo that cannot be loaded or converted as asked."""
