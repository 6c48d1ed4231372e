"""Fully sharded parameters on DTensor (the SimpleFSDP way, arXiv 2411.00284).

Each parameter leaf becomes a ``DTensor`` sharded on its first axis over a ``DeviceMesh``
(``Shard(0)``; uneven first axes, such as a vocabulary of 65 on 4 ranks, give uneven shards).
Where a layer needs a whole weight, :func:`gather` redistributes it to ``Replicate`` and takes
the local tensor with ``grad_placements=[Partial()]``: autograd then all-gathers in the forward
and reduce-scatters (sums) the gradient in the backward, so the gradient comes back sharded
like the parameter. :func:`gather_tree` does the same for a whole block with ONE all-gather and
ONE reduce-scatter (a collective per leaf was ~4x slower on gloo). Nothing here knows the
model; ``gptfn.train.fsdp`` runs the one ``gptfn.model.block`` over gathered blocks.

Memory: a gathered block lives while the block runs; :func:`regather_saved` keeps autograd
from holding the gathered copies until the backward (it saves the shards and gathers the block
again at its first use in the backward), so the peak is about 1/N of the model plus a block
or two (docs/distributed.md has the measurements).

``torch.func`` cannot differentiate through DTensor (inside the transform a leaf is a plain
tensor without ``redistribute``; the functional collectives' autograd function has no
``setup_context``), so the sharded step takes its gradient with ``torch.autograd``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class _Gathered:
    """One gather's shards, and while the backward needs them again, their whole copies."""

    shards: list[DTensor]
    pending: int = 0  # saved tensors (views of the whole copies) not yet unpacked
    whole: list[Tensor] | None = None


_GATHERED: dict[int, tuple[weakref.ref, _Gathered, int]] = {}  # storage -> (copy, gather, index)


def _remember(full: list[Tensor], shards: list[DTensor]) -> None:
    """Let :func:`regather_saved` know these tensors are gathered copies of ``shards``."""
    group = _Gathered(shards)
    for index, whole in enumerate(full):
        _GATHERED[whole.untyped_storage().data_ptr()] = (weakref.ref(whole), group, index)


def gather(leaf: Tensor) -> Tensor:
    """The whole of a sharded leaf as a plain tensor, differentiable: all-gather forward,
    reduce-scatter (a sum over ranks) of its gradient backward. Plain tensors pass through."""
    if not isinstance(leaf, DTensor):
        return leaf
    replicated = [Replicate()] * leaf.device_mesh.ndim
    full = leaf.redistribute(placements=replicated).to_local(
        grad_placements=[Partial()] * leaf.device_mesh.ndim
    )
    _remember([full], [leaf])
    return full


def gather_tree(tree: Tree) -> Tree:
    """Every leaf of ``tree`` (one block's parameters) whole, differentiable, like
    :func:`gather` leaf by leaf but with ONE all-gather for the whole tree in the forward and
    ONE reduce-scatter of its gradients in the backward: measured on gloo, a collective per
    leaf made the step ~4x slower than data parallel."""
    leaves, spec = optree.tree_flatten(tree)
    sharded = [i for i, x in enumerate(leaves) if isinstance(x, DTensor)]
    kinds = {(leaves[i].dtype, leaves[i].device_mesh, tuple(leaves[i].placements)) for i in sharded}
    if len(kinds) != 1:  # nothing sharded, or mixed dtypes/meshes: leaf by leaf
        return optree.tree_map(gather, tree)
    shards = [leaves[i] for i in sharded]
    full = list(_GatherMany.apply(*shards))
    _remember(full, shards)
    for i, whole in zip(sharded, full):
        leaves[i] = whole
    return optree.tree_unflatten(spec, leaves)


def _pack(t: Tensor) -> Any:
    """Saved for the backward: a gathered weight (or a view of it) as its gather and view."""
    entry = _GATHERED.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
    if entry is None or entry[0]() is None:
        return t
    _, group, index = entry
    group.pending += 1
    return group, index, t.size(), t.stride(), t.storage_offset()


def _unpack(saved: Any) -> Tensor:
    """The saved tensor again. A gathered weight: its whole gather (the block) is all-gathered
    anew at the first use in the backward and kept until its last saved view is unpacked."""
    if isinstance(saved, Tensor):
        return saved
    group, index, size, stride, offset = saved
    if group.whole is None:
        with torch.no_grad():
            group.whole = _gather_flat(group.shards)
    whole = group.whole[index]
    group.pending -= 1
    if group.pending <= 0:
        group.whole = None
    return whole.as_strided(size, stride, offset)


@contextlib.contextmanager
def regather_saved() -> Iterator[None]:
    """Within: autograd saves a gathered weight as its shard and gathers it again in the
    backward, so gathered copies die with their block (peak ≈ 1/N model + one block)."""
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _GATHERED.clear()


# torch 2.13 renamed the flat collectives (the old names warn); older releases have the old ones
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _rows(n: int, ranks: int) -> int:
    """Rows of each (padded) shard of an axis of ``n`` split as ``torch.chunk`` splits it."""
    return -(-n // ranks)


def _gather_flat(shards: list[DTensor]) -> list[Tensor]:
    """The whole tensors of ``shards`` (same dtype, mesh, placements) from ONE all-gather over
    the mesh's shard axis: each local shard padded to the largest shard's rows, flattened."""
    mesh = shards[0].device_mesh
    ranks = mesh.size(mesh.ndim - 1)
    pieces = []
    for x in shards:
        part = x.to_local()
        pad = _rows(x.shape[0], ranks) - part.shape[0]
        part = torch.cat([part, part.new_zeros(pad, *part.shape[1:])]) if pad else part
        pieces.append(part.reshape(-1))
    flat = torch.cat(pieces)
    every = flat.new_empty(ranks * flat.numel())
    _ALL_GATHER(every, flat, group=mesh.get_group(mesh.ndim - 1))
    every = every.view(ranks, -1)
    out, start = [], 0
    for x in shards:
        size = _rows(x.shape[0], ranks) * x.shape[1:].numel()
        block = every[:, start : start + size].reshape(-1, *x.shape[1:])
        out.append(block[: x.shape[0]].contiguous())
        start += size
    return out


class _GatherMany(torch.autograd.Function):
    """Sharded leaves (same dtype, mesh and placements) -> whole plain tensors: one all-gather
    forward (:func:`_gather_flat`); backward, one reduce-scatter (sum) of the gradients laid
    out the same way, then an all-reduce across the replicate axis of a 2-D mesh."""

    @staticmethod
    def forward(ctx: Any, *leaves: DTensor) -> tuple[Tensor, ...]:
        ctx.mesh, ctx.placements = leaves[0].device_mesh, leaves[0].placements
        ctx.shapes = [(x.shape, x.stride()) for x in leaves]
        ctx.dtype = leaves[0].dtype
        return tuple(_gather_flat(list(leaves)))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[DTensor, ...]:
        mesh, ranks = ctx.mesh, ctx.mesh.size(ctx.mesh.ndim - 1)
        sizes = [_rows(shape[0], ranks) * shape[1:].numel() for shape, _ in ctx.shapes]
        flat = torch.zeros(ranks, sum(sizes), dtype=ctx.dtype, device=mesh.device_type)
        start = 0
        for (shape, _), size, g in zip(ctx.shapes, sizes, grads):
            rows = _rows(shape[0], ranks)
            if g is not None:  # each rank's rows, in place (padding stays zero): no copies
                dst, src = (
                    flat[:, start : start + size].view(ranks, rows, -1),
                    g.reshape(len(g), -1),
                )
                for r in range(ranks):
                    part = src[r * rows : (r + 1) * rows]
                    dst[r, : part.shape[0]] = part
            start += size
        flat = flat.reshape(-1)
        mine = flat.new_empty(flat.numel() // ranks)
        _REDUCE_SCATTER(mine, flat, group=mesh.get_group(mesh.ndim - 1))
        if mesh.ndim > 1:  # hybrid: sum the replicas' gradients too
            dist.all_reduce(mine, group=mesh.get_group(0))
        rank, out, start = mesh.get_local_rank(mesh.ndim - 1), [], 0
        for shape, stride in ctx.shapes:
            rows = _rows(shape[0], ranks)
            size = rows * shape[1:].numel()
            local = mine[start : start + size].view(rows, *shape[1:])
            keep = max(0, min(rows, shape[0] - rank * rows))
            out.append(
                DTensor.from_local(
                    local[:keep].contiguous(),
                    mesh,
                    ctx.placements,
                    run_check=False,
                    shape=shape,
                    stride=stride,
                )
            )
            start += size
        return tuple(out)


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
