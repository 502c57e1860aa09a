"""How a training run stops early on purpose, and how a lost torchrun peer is told from a bug.

- ``StopSignals``: SIGTERM/SIGINT only record themselves; a second signal aborts at once.
- ``StopRequest``: what a rank votes in the step's all-reduce (the signal it received, 0 for none) and the
  words for the summed votes, ``describe_stop``: "SIGTERM to rank 1", "SIGINT to every rank".
- ``peer_failure`` / ``describe_lost_peer``: a collective that failed because another rank is gone (gloo:
  "Connection closed by peer"), and which rank that was, read from the (host, PID) table that
  ``init_distributed`` gathers: a rank on this host whose process has ended.

Imports the training set-up (for TrainingStopped) and what is below it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from emanet.train.distributed import DistEnv
from emanet.train.runs import pid_alive
from emanet.train.setup import TrainingStopped

EXIT_PEER_LOST = 5  # torchrun: another rank is gone; the newest checkpoint is kept, resume with --resume

# ----------------------------------------------------------------------------- stop signals


class StopSignals:
    """While active, SIGTERM and SIGINT only record themselves in ``received``: the training loop checks it
    once per step, saves and stops. A second signal aborts at once (KeyboardInterrupt for SIGINT, the default
    action for SIGTERM). The previous handlers come back on exit. Outside the main thread nothing is
    installed (Python delivers signals to the main thread only)."""

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self.installed = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            return
        # second signal: give up on the clean stop
        signal.signal(signum, signal.SIG_DFL)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)  # None: installed outside Python
        self._previous.clear()
        self.installed = False


@dataclass
class StopRequest:
    """SIGTERM/SIGINT (``signals``) or ``train(stop_at=...)``: the training loop saves a checkpoint and stops."""

    signals: StopSignals
    stop_at: int | None

    def signal(self) -> int:
        """This rank's vote: the signal it received, 0 for none."""
        return self.signals.received or 0

    def reached(self, step: int) -> bool:  # the same on every rank: no vote needed
        return self.stop_at is not None and step >= self.stop_at

    def why(self, votes: Sequence[float]) -> str:
        """Every rank's vote in words: "SIGTERM to rank 1" (under torchrun), "signal 15" (one process)."""
        return describe_stop(votes) if any(votes) else "stop_at"


def describe_stop(votes: Sequence[float]) -> str:
    """Who asked to stop, from the summed votes (one entry per rank: the signal it received, 0 none)."""
    if len(votes) == 1:
        return f"signal {int(votes[0])}"
    by_signal: dict[int, list[int]] = {}
    for rank, vote in enumerate(votes):
        if vote:
            by_signal.setdefault(int(vote), []).append(rank)
    parts = []
    for signum, ranks in by_signal.items():
        if len(ranks) == len(votes):
            who = "every rank"
        else:
            who = ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
        parts.append(f"{signal_name(signum)} to {who}")
    return "; ".join(parts)


def signal_name(signum: int) -> str:
    """SIGTERM, SIGINT, ...; "signal N" for a number this platform does not name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ----------------------------------------------------------------------------- a lost peer

# What gloo and NCCL say when the other end of a collective is gone. torch 2.13, gloo, a killed rank: a plain
# RuntimeError "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:25517. This is
# typically caused by a remote worker crashing. ..."; newer releases raise torch.distributed.DistError.
_PEER_FAILURE = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|remote worker|Socket Timeout|gloo/transport"
    r"|NCCL (error|communicator)|ProcessGroup\w* is (aborted|terminated)",
    re.IGNORECASE,
)


def peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank is gone, not a bug of this one."""
    return isinstance(error, getattr(dist, "DistError", ())) or bool(_PEER_FAILURE.search(str(error)))


class PeerLost(TrainingStopped):
    """A collective failed because another rank is gone (killed, crashed, its node lost): raised on the ranks
    that are left, without meeting again. Rank 0 says it; if rank 0 is the one lost, the lowest rank left."""

    exit_code = EXIT_PEER_LOST

    def __init__(self, message: str, *, speaker: int, **kw: Any):
        super().__init__(message, **kw)
        self.speaker = speaker

    @property
    def speaks(self) -> bool:
        return self.rank == self.speaker


def peer_lost(env: DistEnv, error: BaseException, *, step: int, checkpoint: str | None) -> PeerLost:
    """The stop for a collective that failed: which rank, what happened, what was saved, how to resume."""
    lost, who, reason = describe_lost_peer(env, error)
    when = f"at iteration {step}" if step else "during set-up"
    return PeerLost(
        f"{who} {when}: {reason}; newest checkpoint: {checkpoint or 'none yet'}",
        advice="continue with --resume (the same torchrun command, every process restarted)",
        speaker=min(set(range(env.world_size)) - set(lost)),
        iteration=step,
        checkpoint=checkpoint,
        rank=env.rank,
    )


def describe_lost_peer(env: DistEnv, error: BaseException) -> tuple[list[int], str, str]:
    """(the ranks found gone, who in words, the backend's reason): [1], "rank 1 (PID 4242 on node0) is gone
    (killed or crashed)", "Connection closed by peer [127.0.0.1]:25517"."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    reason = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". This is typically")[0].rstrip(".")
    lost = lost_ranks(env)
    if not lost:
        return [], "the connection to another rank was lost", reason
    who = ", ".join(f"{r} (PID {env.peers[r][1]} on {env.peers[r][0]})" for r in lost)
    if len(lost) == 1:
        return lost, f"rank {who} is gone (killed or crashed)", reason
    return lost, f"ranks {who} are gone (killed or crashed)", reason


def lost_ranks(env: DistEnv, wait_s: float = 2.0) -> list[int]:
    """The other ranks on this host whose process has ended (gone or a zombie), waiting up to ``wait_s`` for
    one: a killed process closes its sockets a moment before it ends. Ranks on other hosts cannot be seen."""
    host = socket.gethostname()
    mine = [(rank, pid) for rank, (h, pid) in enumerate(env.peers) if h == host and rank != env.rank]
    deadline = time.monotonic() + wait_s
    while True:
        gone = [rank for rank, pid in mine if not _alive(pid)]
        if gone or not mine or time.monotonic() >= deadline:
            return gone
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # Linux: a zombie (Z) or dead (X) process has ended
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel whether the PID exists
        return pid_alive(pid)
