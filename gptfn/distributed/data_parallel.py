"""Data parallelism on ``torch.distributed``: launch with ``torchrun``, average gradients.

``gptfn train`` calls :func:`setup` first: under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) it
initialises the process group (NCCL when CUDA is used, gloo otherwise) with a timeout, so a
dead peer ends the run with an error instead of a hang. The training step stays pure; the loop
passes :func:`all_reduce_mean` as the step's gradient hook, which averages gradients across
ranks in a few large flattened buckets (not one collective per leaf).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import optree
import torch
import torch.distributed as dist
from torch import Tensor

from gptfn.tree import Tree

BUCKET_BYTES = 32 * 2**20


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size``; ``local_rank`` picks its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, logs and writes checkpoints."""
        return self.rank == 0


def setup(device: str = "cpu", backend: str = "auto", timeout_s: float = 300.0) -> DistEnv:
    """Initialise the process group when launched by torchrun; a single process otherwise."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend,
            store=_store(rank, world, timeout),
            rank=rank,
            world_size=world,
            timeout=timeout,
        )
    return DistEnv(rank, world, local_rank, device)


def _store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's rendezvous store, with keys prefixed by the restart count.

    Measured here: after ``torchrun --max-restarts`` restarts a group, the new workers could read
    the dead group's addresses from the shared store and fail to connect ("failed to connect
    ... Connection refused") in about half the tries; a per-attempt prefix keeps them apart.
    """
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent_hosts and rank == 0,
        timeout=timeout,
        multi_tenant=not agent_hosts,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"gptfn/attempt_{attempt}/", store)


def teardown() -> None:
    """Destroy the process group if one was made."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tree: Tree) -> Tree:
    """The mean of ``tree`` over all ranks (identity in a single process), computed with one
    all-reduce per ~32 MiB bucket of flattened leaves."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tree
    leaves, spec = optree.tree_flatten(tree)
    world = dist.get_world_size()
    out: list[Tensor] = [None] * len(leaves)  # type: ignore[list-item]
    bucket: list[int] = []

    def flush() -> None:
        flat = torch.cat([leaves[i].reshape(-1) for i in bucket])
        dist.all_reduce(flat)
        flat /= world
        for i, piece in zip(bucket, flat.split([leaves[i].numel() for i in bucket])):
            out[i] = piece.view_as(leaves[i])
        bucket.clear()

    size = 0
    for i, leaf in enumerate(leaves):
        if bucket and (
            size + leaf.numel() * leaf.element_size() > BUCKET_BYTES
            or leaf.dtype != leaves[bucket[0]].dtype
        ):
            flush()
            size = 0
        bucket.append(i)
        size += leaf.numel() * leaf.element_size()
    if bucket:
        flush()
    return optree.tree_unflatten(spec, out)


def mean_scalar(value: float) -> float:
    """The mean of a Python number over ranks (for logging)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


# ----------------------------------------------------------------------------- ZeRO-1


def assign_owners(params: Tree, world_size: int) -> dict[str, int]:
    """Which rank updates each leaf (by dotted path): greedy by size, largest first, to the
    least-loaded rank, so optimizer state is spread about evenly. Deterministic."""
    from gptfn.tree import flatten

    load = [0] * world_size
    owners: dict[str, int] = {}
    for path, leaf in sorted(flatten(params).items(), key=lambda kv: (-kv[1].numel(), kv[0])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[path] = rank
        load[rank] += leaf.numel()
    return owners


def broadcast_from_owners(params: Tree, owners: dict[str, int]) -> Tree:
    """Every leaf as its owner has it: one broadcast per rank of its leaves, flattened."""
    from gptfn.tree import flatten, map_with_path

    flat = flatten(params)
    out = dict(flat)
    for src in range(dist.get_world_size()):
        paths = [p for p in flat if owners[p] == src]
        if not paths:
            continue
        buffer = torch.cat([flat[p].reshape(-1) for p in paths])
        dist.broadcast(buffer, src=src)
        for p, piece in zip(paths, buffer.split([flat[p].numel() for p in paths])):
            out[p] = piece.view_as(flat[p])
    return map_with_path(lambda path, _: out[path], params)  # same structure (and config)


def gather_to_main(flat: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The union of every rank's ``{name: tensor}`` dict on rank 0 (None elsewhere)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flat
    main = dist.get_rank() == 0
    parts: list[Any] | None = [None] * dist.get_world_size() if main else None
    dist.gather_object({k: v.detach().cpu() for k, v in flat.items()}, parts, dst=0)
    if parts is None:
        return None
    merged: dict[str, Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged
