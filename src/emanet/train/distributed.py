"""torch.distributed plumbing for training, and what a run needs to stop and resume exactly.

- ``init_distributed``: the process group from the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE,
  MASTER_ADDR/PORT or a rendezvous): NCCL with one GPU per process on CUDA, gloo on CPU.
- ``ResumableSampler`` + ``PerSampleSeed``: each epoch's order comes from (seed, epoch) and each sample's
  augmentation generator from (seed, epoch, index), so neither the worker that reads a sample, nor the
  number of workers, nor a restart changes what a step sees; a resumed epoch starts part-way in.
- ``DataStream``: the batches of those epochs, with a position (epoch, batches consumed) to save and resume.
- The collectives the engine calls, each a no-op in a single process: ``agree`` (the step's one vote: a few
  numbers summed in one all-reduce), ``average_`` (BN statistics), ``replica_states`` (every rank's RNG
  state and replica digest for a checkpoint, one gather), ``barrier``; set-up uses ``broadcast_object`` and
  ``broadcast_buffers_``. Evaluation shards through emanet.runtime (``shard``, ``all_gather_lists``).
- RNG states (python, numpy, torch, CUDA) for checkpoints; ``state_digest`` to check replicas agree.
- How a run stops (SIGTERM/SIGINT, the stop vote, a lost peer) is emanet.train.stops.

Imports nothing above the data layer.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import os
import random
import signal
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from emanet.data.base import reseedable_datasets
from emanet.data.base import worker_init_fn as data_worker_init_fn
from emanet.errors import ConfigError
from emanet.runtime import select_device

# ----------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # init_distributed created the process group (and destroys it)
    peers: tuple[tuple[str, int], ...] = ()  # (host, PID) of every rank: who is gone when a peer is lost

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> DistEnv:
    """Join the process group that torchrun describes in the environment; a plain process otherwise.

    Under torchrun every process drives one device: ``cuda:LOCAL_RANK`` (NCCL) when CUDA is used, the CPU
    (gloo) otherwise. ``device_name`` then only chooses between CUDA and CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=select_device(device_name))
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} but this torch build has no torch.distributed support")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = select_device(device_name).type == "cuda"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "start at most one process per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    peers: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    return DistEnv(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        device=device,
        owns_group=owns,
        peers=tuple((str(host), int(pid)) for host, pid in peers),
    )


def cleanup_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- collectives (no-ops alone)


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(values: torch.Tensor, env: DistEnv) -> list[float]:
    """Sum a few numbers (a 1-D tensor on any device: losses, flags, votes) over all ranks in one all-reduce
    (float64); reading the result back is then the only host sync."""
    if not env.distributed:
        return values.double().tolist()
    summed = values.to(device=_comm_device(), dtype=torch.float64)
    dist.all_reduce(summed)
    return summed.tolist()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, env: DistEnv) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if not env.distributed:
        return [obj]
    out: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def replica_states(model: nn.Module, env: DistEnv) -> tuple[list[dict], list[dict]] | tuple[None, None]:
    """(RNG states, replica digests) of every rank, in rank order, on rank 0 ((None, None) elsewhere): what a
    checkpoint records, in one gather."""
    states = gather_objects((rng_state(env.device), state_digest(model)), env)
    if states is None:
        return None, None
    return [rng for rng, _ in states], [digest for _, digest in states]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def average_(tensors: Sequence[torch.Tensor], env: DistEnv) -> None:
    """Replace each tensor by its mean over ranks, in place (one flattened all-reduce)."""
    if not env.distributed or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]).to(_comm_device())
    dist.all_reduce(flat)
    flat /= env.world_size
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def broadcast_buffers_(module: nn.Module, env: DistEnv) -> None:
    """Copy rank 0's buffers (BN statistics, EM bases) to every rank; once, before training starts."""
    if not env.distributed:
        return
    for buf in module.buffers():
        staged = buf.detach().to(_comm_device())
        dist.broadcast(staged, src=0)
        buf.copy_(staged)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel without the per-forward buffer broadcast (see docs/distributed.md).

    Broadcasting rank 0's buffers on every forward would overwrite the per-rank batch sums that gradient
    accumulation collects in the EM units between forwards; their bases agree on every rank by construction
    (all-reduced update), and BN statistics are averaged after each step instead.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:  # newer torch; the old name warns
        return DDP(model, device_ids=ids, forward_sync_buffers=False)
    return DDP(model, device_ids=ids, broadcast_buffers=False)


def bn_statistics(module: nn.Module) -> list[torch.Tensor]:
    """Running mean/var of every BatchNorm layer that tracks them (not the batch counters)."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out += [m.running_mean, m.running_var]
    return [t for t in out if t is not None]


# ----------------------------------------------------------------------------- data order and augmentation


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle per (seed, epoch), drop_last) that yields ``(index, epoch)`` keys
    for ``PerSampleSeed`` and can start ``skip`` samples into this rank's share of an epoch."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.skip = 0

    def start(self, epoch: int, skip: int = 0) -> None:
        """The next iteration yields epoch ``epoch`` from its ``skip``-th sample on (no sample is read)."""
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        for index in itertools.islice(super().__iter__(), self.skip, None):
            yield int(index), self.epoch

    def __len__(self) -> int:
        return self.num_samples - self.skip


def worker_init(worker_id: int) -> None:
    """DataLoader worker hook: ignore SIGTERM/SIGINT, then the data layer's own seeding.

    torchrun (killpg), Slurm and Ctrl-C signal the whole process group, workers included; a worker killed
    mid-epoch would crash the training process before it can save. The main process decides when workers
    stop, and they exit by themselves if it dies.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    data_worker_init_fn(worker_id)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class PerSampleSeed(Dataset):
    """Reads ``dataset[index]`` for a key ``(index, epoch)`` after re-seeding the augmentation generator
    from (seed, epoch, index): the same sample gets the same crop/flip/scale whichever worker or process
    reads it, and a resumed run repeats the augmentation of an uninterrupted one."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.targets = reseedable_datasets(dataset)

    @property
    def seeded(self) -> bool:
        return bool(self.targets)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        for ds in self.targets:
            ds.reseed(sample_seed(self.seed, epoch, index))
        return self.dataset[index]


class DataStream:
    """Training batches in epoch order with a resumable position: (epoch, batches consumed in it).

    A resumed epoch starts at its first unread batch through the sampler, without reading the others.
    """

    def __init__(self, loader: DataLoader, sampler: ResumableSampler, epoch: int = 0, batches: int = 0):
        self.loader, self.sampler = loader, sampler
        self.per_epoch = sampler.num_samples // loader.batch_size  # type: ignore[operator]
        self.epoch, self.batches = epoch + batches // self.per_epoch, batches % self.per_epoch
        self._it = None

    def next(self) -> Any:
        if self._it is None:
            self.sampler.start(self.epoch, self.batches * self.loader.batch_size)  # type: ignore[operator]
            self._it = iter(self.loader)
        batch = next(self._it)
        self.batches += 1
        if self.batches == self.per_epoch:
            for _ in self._it:  # end the epoch cleanly (workers are told the iterator is done)
                pass
            self.epoch, self.batches, self._it = self.epoch + 1, 0, None
        return batch

    def close(self) -> None:
        """Stop the loader's worker processes now. They ignore SIGTERM (see ``worker_init``), so a pool left
        for interpreter exit would never end; this uses the shutdown DataLoader itself uses."""
        it = self._it if self._it is not None else getattr(self.loader, "_iterator", None)
        self._it = None
        if getattr(self.loader, "_iterator", None) is not None:
            self.loader._iterator = None  # the persistent-workers iterator
        shutdown = getattr(it, "_shutdown_workers", None)  # only multi-process iterators have workers
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "batch_size": self.loader.batch_size,
            "world_size": self.sampler.num_replicas,
        }


# ----------------------------------------------------------------------------- RNG states and digests


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators, in types that ``torch.load(weights_only=True)`` reads back."""
    np_state = np.random.get_state(legacy=False)  # a dict; the legacy tuple holds an ndarray
    key, pos = np_state["state"]["key"], int(np_state["state"]["pos"])
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np_state["state"]["key"].numpy().astype(np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def state_digest(module: nn.Module) -> dict[str, str]:
    """SHA-256 of the parameters, the EM bases and the other buffers: equal digests = bitwise-equal replicas."""
    params = {name for name, _ in module.named_parameters()}
    hashes = {"parameters": hashlib.sha256(), "bases": hashlib.sha256(), "buffers": hashlib.sha256()}
    for name, tensor in module.state_dict().items():
        kind = "parameters" if name in params else "bases" if name.endswith(".bases") else "buffers"
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        hashes[kind].update(name.encode())
        hashes[kind].update(data)
    return {k: h.hexdigest() for k, h in hashes.items()}
