"""Distributed plumbing: sampler shards and offsets, per-sample augmentation seeds, RNG states, stop signals,
a real 2-process torchrun (gloo) run compared with one process on the same global batch, and what rank 0 says
when one rank of such a run is sent SIGTERM or killed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from emanet.checkpoint import latest_checkpoint, load_checkpoint
from emanet.config import load_config
from emanet.models.emanet import build_model
from emanet.runtime import all_gather_lists
from emanet.train.distributed import (
    DistEnv,
    PerSampleSeed,
    ResumableSampler,
    agree,
    replica_states,
    rng_state,
    set_rng_state,
    state_digest,
)
from emanet.train.loop import train
from emanet.train.stops import StopSignals, describe_lost_peer, describe_stop, lost_ranks, peer_failure
from tests.conftest import run_cli, tiny_model, tiny_run

TINY = tiny_run("model.dropout=0.0", "train.log_interval=1", scales="[0.75, 1.25]", length=8)


pytestmark = pytest.mark.usefixtures("one_thread")


class Draws(Dataset):
    """Returns (index, a draw from its generator): shows which generator state a sample was read with."""

    def __init__(self, n: int):
        self.n, self.rng = n, np.random.default_rng(0)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return i, float(self.rng.random())


class Wrapper(Dataset):  # like Subset / SkipBadSamples: the reseedable dataset sits inside
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


def test_sampler_shards_are_disjoint_and_skip_resumes_the_same_order():
    ds = Draws(11)
    shards = [list(ResumableSampler(ds, num_replicas=3, rank=r, seed=5)) for r in range(3)]
    indices = [i for shard in shards for i, _ in shard]
    assert len(indices) == len(set(indices)) == 9  # 11 -> 9: the tail that does not divide is dropped
    assert all(e == 0 for shard in shards for _, e in shard)
    s = ResumableSampler(ds, num_replicas=1, rank=0, seed=5)
    s.start(2)
    full = list(s)
    s.start(2, skip=4)
    assert list(s) == full[4:] and len(s) == len(full) - 4 and full[0][1] == 2
    s.start(3)
    assert [i for i, _ in s] != [i for i, _ in full]  # a new order every epoch


def test_per_sample_seed_ignores_read_order_and_wrappers():
    a, b = PerSampleSeed(Wrapper(Draws(6)), seed=1), PerSampleSeed(Draws(6), seed=1)
    assert a.seeded and b.seeded
    keys = [(i, 0) for i in range(6)]
    forward = [a[k] for k in keys]
    backward = [b[k] for k in reversed(keys)][::-1]
    assert forward == backward  # same draw per (epoch, index), whatever was read before
    assert a[(2, 1)] != a[(2, 0)]  # another epoch, another augmentation
    assert not PerSampleSeed(list(range(3)), seed=1).seeded


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    import random

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = rng_state(torch.device("cpu"))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save({"rng": [state]}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)["rng"][0]
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    set_rng_state(loaded, torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_stop_signals_set_a_flag_then_abort_and_restore_handlers():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert stop.installed and not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # handled synchronously at the next bytecode
        assert stop.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second signal does not wait for the loop
    assert signal.getsignal(signal.SIGINT) is before
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_digest_sees_bases_and_single_process_collectives_are_identity():
    model = build_model(tiny_model())
    d0 = state_digest(model)
    model.head.context.bases[0, 0, 0] += 1e-7
    d1 = state_digest(model)
    assert d1["bases"] != d0["bases"] and d1["parameters"] == d0["parameters"]
    assert agree(torch.tensor([1.5, 0, 1]), DistEnv()) == [1.5, 0.0, 1.0]
    rngs, digests = replica_states(model, DistEnv())
    assert digests == [d1] and len(rngs) == 1 and torch.equal(rngs[0]["torch"], torch.get_rng_state())
    assert all_gather_lists(["a: bad"]) == ["a: bad"]


def test_torchrun_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    # 2 processes x batch 1 x 2 accumulated micro-batches vs 1 process x batch 4. BN statistics frozen
    # (train.freeze_bn) and no dropout: the two runs then compute the same function of the same 4 samples.
    common = [*TINY, "train.freeze_bn=true", "train.iterations=2", "train.checkpoint_interval=1"]
    ddp_run = tmp_path / "ddp"
    proc = run_cli(
        "train",
        "--no-progress",
        *common,
        "train.batch_size=1",
        "train.accum_steps=2",
        f"train.out_dir={ddp_run}",
        processes=2,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    said = proc.stdout + proc.stderr  # log lines go to stderr, results to stdout
    assert said.count("global batch = per-process batch x processes x accumulation = 1 x 2 x 2 = 4") == 1
    assert proc.stdout.count("run folder:") == 1  # only rank 0 reports

    ddp = load_checkpoint(latest_checkpoint(ddp_run).path)
    assert ddp["iteration"] == 2 and ddp["world_size"] == 2 and len(ddp["rng"]) == 2
    rank0, rank1 = ddp["replicas"]
    assert rank0 == rank1  # parameters, EM bases and other buffers bitwise equal on both ranks
    assert not torch.equal(ddp["rng"][0]["torch"], ddp["rng"][1]["torch"])  # per-rank streams, both saved

    single = train(
        load_config(None, [*common, "train.batch_size=4", f"train.out_dir={tmp_path / 'one'}"]),
        progress=False,
    )
    ref = single["model"].state_dict()
    first = load_checkpoint(ddp_run / "iter_0000001.pt")
    assert not torch.equal(ddp["model"]["head.context.bases"], first["model"]["head.context.bases"])  # they move
    # evaluation sharded over the two ranks (one image each), matrices summed once: no image counted twice
    ddp_eval = json.loads((ddp_run / "eval.json").read_text())
    assert ddp_eval["images"] == single["results"]["images"] == 2
    assert ddp_eval["aAcc"] == pytest.approx(single["results"]["aAcc"], abs=1e-3)
    for key, value in ref.items():
        if value.is_floating_point():
            torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(ddp["model"][key], value), key


def test_the_stop_vote_in_words_names_each_rank_and_its_signal():
    assert describe_stop([15.0]) == "signal 15"  # one process: as before
    assert describe_stop([0.0, 15.0]) == "SIGTERM to rank 1"
    assert describe_stop([2.0, 2.0]) == "SIGINT to every rank"
    assert describe_stop([15.0, 0.0, 15.0, 2.0]) == "SIGTERM to ranks 0, 2; SIGINT to rank 3"


GLOO_LOST = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:25517. This is typically caused by a remote worker crashing. Check the logs of the remote worker "
    "before reporting an error. GLHF!"
)


def test_a_lost_peer_is_told_from_a_bug_and_named_by_rank_and_pid():
    assert peer_failure(RuntimeError(GLOO_LOST)) and peer_failure(RuntimeError("Connection reset by peer"))
    assert not peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        env = DistEnv(rank=0, world_size=3, peers=((host, os.getpid()), (host, ended.pid), (host, alive.pid)))
        assert lost_ranks(env, wait_s=0) == [1]
        lost, who, reason = describe_lost_peer(env, RuntimeError(GLOO_LOST))
        assert lost == [1] and who == f"rank 1 (PID {ended.pid} on {host}) is gone (killed or crashed)"
        assert reason == "Connection closed by peer [127.0.0.1]:25517"
        elsewhere = DistEnv(rank=0, world_size=2, peers=((host, os.getpid()), ("other-node", 1)))
        assert describe_lost_peer(elsewhere, RuntimeError(GLOO_LOST))[:2] == (
            [],
            "the connection to another rank was lost",
        )
    finally:
        alive.kill()
        alive.wait()


def _torchrun_until_training(run: Path) -> subprocess.Popen:
    """A 2-process torchrun training that goes on for long, returned once a few steps are logged."""
    overrides = [*TINY, "train.batch_size=1", "train.iterations=100000", "train.checkpoint_interval=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["-m", "emanet", "train", "--no-progress", *overrides, f"train.out_dir={run}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    return proc


def _rank_pid(launcher: int, rank: int) -> int:
    """The PID of torchrun's worker of ``rank`` (Linux /proc: its parent and its RANK variable)."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under PID {launcher}")


def _rank0_said(err: str) -> str:
    """Rank 0's one line; nothing of emanet's code in a traceback (torchrun's own summary may follow)."""
    assert not re.search(r'File ".*[/\\]emanet[/\\]', err) and "[rank0]:" not in err, err[-4000:]
    (line,) = [x for x in err.splitlines() if x.startswith("emanet train:")]
    return line


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_sigterm_to_one_rank_is_reported_by_rank_0_naming_the_rank_and_the_signal(tmp_path):
    run = tmp_path / "run"
    proc = _torchrun_until_training(run)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    line = _rank0_said(err)
    step = load_checkpoint(latest_checkpoint(run).path)["iteration"]
    assert line == (
        f"emanet train: stopped at iteration {step} (SIGTERM to rank 1); checkpoint {run / f'iter_{step:07d}.pt'}; "
        "continue with --resume"
    )
    assert "exitcode  : 3" in err  # both workers: the interrupted status


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_killed_rank_is_reported_by_rank_0_in_words_with_the_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = _torchrun_until_training(run)
    victim = _rank_pid(proc.pid, 1)
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    line = _rank0_said(err)
    assert re.fullmatch(
        rf"emanet train: rank 1 \(PID {victim} on .+\) is gone \(killed or crashed\) at iteration \d+: .+; "
        rf"newest checkpoint: {re.escape(str(run))}/iter_\d{{7}}\.pt; continue with --resume \(the same torchrun "
        r"command, every process restarted\)",
        line,
    ), line
    newest = line.split("newest checkpoint: ")[1].split(";")[0]
    assert Path(newest).is_file() and load_checkpoint(newest)["iteration"] >= 2
