"""Data-parallel training on ``torch.distributed``: the process group, the shards, agreement between ranks.

``torchrun --nproc_per_node N lmk3d train ...`` starts N processes with the ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` variables set. The :class:`~lmk3d.training.loop.Trainer`
of each process reads them (:func:`world_from_env`) and joins one process group (:func:`init_group`):
``nccl`` when it trains on CUDA (each rank on ``cuda:LOCAL_RANK``, :func:`rank_device`), ``gloo`` on the
CPU. Everything here is a no-op answer (rank 0 of 1) outside such a launch, so single-process training
runs exactly the code it ran before.

What the ranks share and what they split:

- every rank reads the whole training set and does the deterministic work between phases (fitted
  ranges, shape models, estimates of the previous stage) on all of it, so the fitted state is the same
  on every rank and equals a single-process fit's;
- the gradient steps of an epoch go over the rank's **shard** only (:func:`shard`: ``items[rank::world]``,
  padded with the shard's own first items so that every rank takes the same number of steps; DDP
  averages the gradients, so one epoch still covers the training set once);
- every rank validates on the whole validation set with the same weights; rank 0's number and its stop
  decision are broadcast (:func:`agree`), so early stopping and the best epoch cannot differ between
  ranks (a difference would deadlock the next collective call).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from lmk3d.errors import LandmarkError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

__all__ = ["World", "agree", "all_gather", "broadcast_buffers", "check_resume", "init_group", "rank_device",
           "shard", "weights_digest", "world_from_env"]


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(environ: dict[str, str] | None = None) -> World:
    """The torchrun variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); rank 0 of 1 when they are absent."""
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise LandmarkError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun): {e}") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise LandmarkError(f"bad torchrun variables: WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local}")
    return World(size, rank, local)


def check_resume(state: dict[str, Any] | None, world: World) -> None:
    """Refuse to resume a training state written by a run with another number of processes.

    The state holds one random-generator state per rank and the shards follow from the number of
    ranks, so only the same number continues the run as it would have gone on.
    """
    saved = int((state or {}).get("world_size", 1))
    if state is not None and saved != world.size:
        raise LandmarkError(f"the interrupted training ran as {saved} process(es); resume it with the same number "
                            f"(torchrun --nproc_per_node ...), not {world.size}")


def rank_device(device: str | None, world: World) -> str:
    """The device a rank trains on: ``cuda:LOCAL_RANK`` when it trains on CUDA in a distributed run.

    ``device`` None means CUDA when present (as for a single process); ``cpu`` stays ``cpu``.
    """
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world.distributed and torch.device(dev).type == "cuda":
        return f"cuda:{world.local_rank}"
    return dev


def init_group(world: World, device: torch.device) -> bool:
    """Join the process group of a torchrun launch (env:// rendezvous); True when this call created it.

    The backend follows the device: ``nccl`` on CUDA, ``gloo`` on the CPU.
    """
    import torch
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        raise RuntimeError(f"process group ({dist.get_rank()} of {dist.get_world_size()}) does not match "
                           f"WORLD_SIZE/RANK ({world.rank} of {world.size})")
    return True


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(items: Sequence[T], world: World) -> list[T]:
    """This rank's share of ``items``: ``items[rank::size]``, padded to ``ceil(len / size)`` with its own first items.

    Every rank gets the same length (so the same number of optimiser steps: DDP needs it), and as sets
    the shards are disjoint and cover ``items``. With fewer items than ranks, rank ``r`` takes item
    ``r % len`` (shards then overlap). A single process gets all of ``items``, in order.
    """
    out = list(items)
    if not world.distributed or not out:
        return out
    mine = out[world.rank::world.size]
    if not mine:
        return [out[world.rank % len(out)]]
    need = -(-len(out) // world.size)
    return (mine * need)[:need]


def agree(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable value); ``value`` itself outside a distributed run."""
    if not _active():
        return value
    import torch.distributed as dist

    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[no-any-return]


def all_gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order (``[value]`` outside a distributed run)."""
    if not _active():
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP averages gradients, so parameters stay equal; running statistics are updated by each rank's own
    batches, and are made equal again after every epoch, before validation and before any weights are kept.
    """
    if not _active():
        return
    import torch.distributed as dist

    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


def weights_digest(modules: Iterable[tuple[str, torch.nn.Module]]) -> str:
    """SHA-256 of named modules' state dicts (names, dtypes, shapes and bytes): equal weights, equal digest."""
    import torch

    h = hashlib.sha256()
    for name, module in modules:
        for key, t in sorted(module.state_dict().items()):
            arr = t.detach().cpu().contiguous()
            h.update(f"{name}.{key}:{arr.dtype}:{tuple(arr.shape)}".encode())
            h.update(arr.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
