"""Fully sharded parameters on DTensor (the SimpleFSDP way, arXiv 2411.00284).

Each parameter leaf becomes a ``DTensor`` sharded on its first axis over a ``DeviceMesh``
(``Shard(0)``; uneven first axes, such as a vocabulary of 65 on 4 ranks, give uneven shards).
Where a layer needs a whole weight, :func:`gather` redistributes it to ``Replicate`` and takes
the local tensor with ``grad_placements=[Partial()]``: autograd then all-gathers in the forward
and reduce-scatters (sums) the gradient in the backward, so the gradient comes back sharded
like the parameter. Nothing here knows the model; ``gptfn.train.fsdp`` runs the one
``gptfn.model.block`` over gathered blocks.

Memory: a gathered weight lives while its block runs; :func:`regather_saved` keeps autograd
from holding the gathered copies until the backward (it saves the shard and gathers again when
the backward needs the weight), so the peak is about 1/N of the model plus one block.

``torch.func`` cannot differentiate through DTensor (inside the transform a leaf is a plain
tensor without ``redistribute``; the functional collectives' autograd function has no
``setup_context``), so the sharded step takes its gradient with ``torch.autograd``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import optree
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from gptfn.tree import Tree


def parse_mesh(spec: str | None, world_size: int) -> tuple[int, int]:
    """``(replicas, shards)`` from ``--mesh RxS`` (default ``1xN``: shard over every rank);
    refuses a shape whose product is not the number of ranks, by name."""
    if not spec:
        return 1, world_size
    try:
        replicas, shards = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"--mesh {spec!r}: expected REPLICASxSHARDS, e.g. 2x2") from None
    if replicas < 1 or shards < 1 or replicas * shards != world_size:
        raise ValueError(
            f"--mesh {spec}: {replicas} x {shards} = {replicas * shards} ranks, but torchrun "
            f"started {world_size}"
        )
    return replicas, shards


def make_mesh(device: str, spec: str | None = None) -> DeviceMesh:
    """The device mesh of this torchrun group: 1-D ``("shard",)``, or with ``--mesh RxS``
    2-D ``("replicate", "shard")`` (hybrid: replicate across nodes, shard within a node)."""
    world = dist.get_world_size()
    replicas, shards = parse_mesh(spec, world)
    kind = torch.device(device).type
    if replicas == 1:
        return init_device_mesh(kind, (shards,), mesh_dim_names=("shard",))
    return init_device_mesh(kind, (replicas, shards), mesh_dim_names=("replicate", "shard"))


def _sharded(mesh: DeviceMesh) -> list[Any]:
    """Placements of a sharded leaf: Shard(0) on the shard axis, Replicate on the other."""
    return [Replicate()] * (mesh.ndim - 1) + [Shard(0)]


def shard(tree: Tree, mesh: DeviceMesh) -> Tree:
    """``tree`` with each leaf of one or more axes a DTensor sharded on its first axis
    (0-d leaves, such as step counts, stay plain tensors, the same on every rank). Every rank
    holds the whole tree before (same seed): each keeps its slice, no communication."""

    def one(leaf: Any) -> Any:
        if not isinstance(leaf, Tensor) or isinstance(leaf, DTensor) or leaf.ndim == 0:
            return leaf
        return distribute_tensor(leaf.detach(), mesh, _sharded(mesh), src_data_rank=None)

    return optree.tree_map(one, tree)


def unshard(tree: Tree) -> Tree:
    """``tree`` with each DTensor leaf gathered whole (a plain tensor on every rank)."""
    return optree.tree_map(lambda x: x.full_tensor() if isinstance(x, DTensor) else x, tree)


def local(tree: Tree) -> Tree:
    """Each DTensor leaf's local shard (plain tensors stay as they are)."""
    return optree.tree_map(lambda x: x.to_local() if isinstance(x, DTensor) else x, tree)


_GATHERED: dict[int, tuple[weakref.ref, DTensor]] = {}  # storage address -> (full copy, shard)


def gather(leaf: Tensor) -> Tensor:
    """The whole of a sharded leaf as a plain tensor, differentiable: all-gather forward,
    reduce-scatter (a sum over ranks) of its gradient backward. Plain tensors pass through."""
    if not isinstance(leaf, DTensor):
        return leaf
    replicated = [Replicate()] * leaf.device_mesh.ndim
    full = leaf.redistribute(placements=replicated).to_local(
        grad_placements=[Partial()] * leaf.device_mesh.ndim
    )
    _GATHERED[full.untyped_storage().data_ptr()] = (weakref.ref(full), leaf)
    return full


def gather_tree(tree: Tree) -> Tree:
    """:func:`gather` on every leaf of ``tree`` (one block's parameters)."""
    return optree.tree_map(gather, tree)


def _pack(t: Tensor) -> Any:
    """Saved for the backward: a gathered weight (or a view of it) as its shard and view."""
    entry = _GATHERED.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
    if entry is None or entry[0]() is None:
        return t
    return entry[1], t.size(), t.stride(), t.storage_offset()


def _unpack(saved: Any) -> Tensor:
    """The saved tensor again; a gathered weight is all-gathered anew (once per backward use)."""
    if isinstance(saved, Tensor):
        return saved
    leaf, size, stride, offset = saved
    with torch.no_grad():
        full = leaf.full_tensor()
    return full.as_strided(size, stride, offset)


@contextlib.contextmanager
def regather_saved() -> Iterator[None]:
    """Within: autograd saves a gathered weight as its shard and gathers it again in the
    backward, so gathered copies die with their block (peak ≈ 1/N model + one block)."""
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _GATHERED.clear()


def local_bytes(tree: Tree) -> int:
    """Bytes of this rank's storage of ``tree``: a DTensor's local shard, a plain leaf whole."""
    total = 0
    for x in optree.tree_leaves(tree):
        if isinstance(x, Tensor):
            x = x.to_local() if isinstance(x, DTensor) else x
            total += x.numel() * x.element_size()
    return total


def is_sharded(tree: Tree) -> bool:
    """Whether any leaf of ``tree`` is a DTensor."""
    return any(isinstance(x, DTensor) for x in optree.tree_leaves(tree))
