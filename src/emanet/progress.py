"""Progress for people and for log files: a tqdm bar on a terminal, plain lines everywhere else.

A tqdm bar redraws itself with carriage returns; written into a Slurm log, a CI log or ``> file`` those
redraws pile up into one very long line. When the stream is not a terminal, ``progress_bar`` instead prints
one complete line every ``every`` steps and at the end::

    train: 40/200 it (20%), 12.3 s, 3.25 it/s, eta 49 s, loss=0.5312 lr=8.1e-03

A line shows the postfix set before the ``update`` that prints it: callers set the step's figures, then count
the step. Without an explicit ``every`` a bar prints at most about LINES_PER_RUN lines, and none closer than
MIN_SECONDS apart (a job of a few seconds prints one line, its last); an explicit ``every`` (training's
log_interval, whose lines match metrics.jsonl) is kept as asked.

Both kinds have tqdm's small surface: ``update(n)``, ``set_postfix(**values)``, ``write(message)``, ``close()``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

LINES_PER_RUN = 20  # plain mode's default: at most about this many lines for a whole bar
MIN_SECONDS = 5.0  # plain mode's default: no two lines closer in time (the last line always comes)


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


class LineProgress:
    """Plain-text progress: one line per ``every`` steps, plus the last one; nothing is redrawn."""

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str,
        initial: int = 0,
        every: int | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start = initial
        explicit = every is not None and every >= 1
        self.every = every if explicit else max(1, math.ceil((total - initial) / LINES_PER_RUN))
        self.min_seconds = 0.0 if explicit else MIN_SECONDS  # an explicit interval is the caller's choice
        self.stream = stream if stream is not None else sys.stderr
        self.postfix: dict[str, Any] = {}
        self._clock = clock
        self._t0 = self._last_time = clock()
        self._last_printed = initial
        self._closed = False

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:  # refresh: tqdm's, nothing to redraw
        self.postfix = values

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        at_end = bool(self.total) and self.n >= self.total > before  # always said
        due = self.n // self.every > before // self.every and self._clock() - self._last_time >= self.min_seconds
        if at_end or due:
            self._line()

    def _line(self) -> None:
        now = self._clock()
        elapsed = now - self._t0
        done = self.n - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(_seconds(elapsed))
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"eta {_seconds((self.total - self.n) / rate)}")
        line = ", ".join(parts)
        if self.postfix:
            line += ", " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        self.write(line, stream=self.stream)
        self._last_printed, self._last_time = self.n, now

    @staticmethod
    def write(message: str, stream: TextIO | None = None) -> None:
        out = stream if stream is not None else sys.stderr
        print(message, file=out, flush=True)

    def close(self) -> None:
        if not self._closed and self.n != self._last_printed:  # stopped early: say where
            self._line()
        self._closed = True


def progress_bar(
    total: int,
    *,
    desc: str,
    unit: str,
    initial: int = 0,
    every: int | None = None,
    stream: TextIO | None = None,
    leave: bool = True,
):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a LineProgress printing every
    ``every`` steps (default: about LINES_PER_RUN lines in all)."""
    out = stream if stream is not None else sys.stderr
    if is_terminal(out):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave, file=out)
    return LineProgress(total, desc=desc, unit=unit, initial=initial, every=every, stream=out)


def write(message: str, stream: TextIO | None = None) -> None:
    """A message that leaves a terminal bar intact (tqdm.write) or is a plain line."""
    out = stream if stream is not None else sys.stderr
    if is_terminal(out):
        from tqdm import tqdm

        tqdm.write(message, file=out)
    else:
        print(message, file=out, flush=True)
