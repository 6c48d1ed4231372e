"""Combinators: ``chain`` transforms in sequence, ``masked`` to apply one to part of a tree."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
from torch import Tensor

from gptfn.optim.base import GradientTransformation, apply_updates, leaf_ops
from gptfn.tracing import is_compiling
from gptfn.tree import Tree, flatten

MaskSpec = Tree | Callable[[str, Tensor], bool]
"""A boolean tree shaped like the params, or a predicate ``(dotted_path, leaf) -> bool``."""


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after another; the state is the tuple of their states. With
    a last transform that has a ``fused_step`` (``adamw``), so has the chain: the others'
    updates, then that one's fused step."""

    def init(params: Tree) -> Tree:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        return _in_turn(transforms, updates, state, params)

    def fused_step(
        updates: Tree, state: Tree, params: Tree, grad_scale: Tensor | None = None
    ) -> tuple[Tree, Tree] | None:
        if grad_scale is not None or not leaf_ops().fused:
            return None  # before anything is spent: the caller's update + apply instead
        *firsts, last = transforms
        updates, new_state = _in_turn(firsts, updates, state[:-1], params)
        stepped = last.fused_step(updates, state[-1], params)  # type: ignore[misc]
        if stepped is None:  # the others' updates are done (in place, when donated)
            updates, last_state = last.update(updates, state[-1], params)
            stepped = apply_updates(params, updates), last_state
        return stepped[0], (*new_state, stepped[1])

    last_fused = bool(transforms) and transforms[-1].fused_step is not None
    return GradientTransformation(init, update, fused_step if last_fused else None)


def _in_turn(
    transforms: Sequence[GradientTransformation], updates: Tree, state: Tree, params: Tree | None
) -> tuple[Tree, tuple]:
    """``transforms``' updates one after another, and their new states."""
    new_state = []
    for t, s in zip(transforms, state, strict=True):
        updates, s = t.update(updates, s, params)
        new_state.append(s)
    return updates, tuple(new_state)


def _selected(mask: MaskSpec, params: Tree) -> list[str]:
    flat = flatten(params)
    if callable(mask):
        return [path for path, leaf in flat.items() if mask(path, leaf)]
    chosen = flatten(mask)
    if chosen.keys() != flat.keys():
        raise ValueError("the mask tree does not have the structure of the params")
    return [path for path, keep in chosen.items() if bool(keep)]


def masked(inner: GradientTransformation, mask: MaskSpec) -> GradientTransformation:
    """Apply ``inner`` to the chosen leaves only; the others pass through unchanged.

    ``inner`` sees (and its state holds) a flat ``{"dotted.path": leaf}`` dict of the chosen
    leaves, so masked state checkpoints under the same paths as the params. The selection is
    computed once per tree structure and leaf shapes, then reused.

    Args:
      inner: The transform to apply to the chosen leaves.
      mask: A predicate ``(dotted_path, leaf) -> bool`` or a boolean tree shaped like the params.

    Returns:
      A ``GradientTransformation`` whose state is ``inner``'s over the chosen leaves.
    """
    select = chooser(mask)

    def init(params: Tree) -> Tree:
        leaves, _, chosen = select(params)
        return inner.init({path: leaves[i] for i, path in chosen})

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        leaves, spec, chosen = select(updates if params is None else params)
        u_leaves = spec.flatten_up_to(updates) if params is not None else leaves
        sub_params = None if params is None else {path: leaves[i] for i, path in chosen}
        new_sub, state = inner.update({path: u_leaves[i] for i, path in chosen}, state, sub_params)
        out = list(u_leaves)
        for i, path in chosen:
            out[i] = new_sub[path]
        return optree.tree_unflatten(spec, out), state

    def fused_step(
        updates: Tree, state: Tree, params: Tree, grad_scale: Tensor | None = None
    ) -> tuple[Tree, Tree] | None:
        """``inner``'s fused step when it chooses every leaf (else the others' updates
        would need a pass of their own)."""
        leaves, spec, chosen = select(params)
        if len(chosen) != len(leaves):
            return None
        u_leaves = spec.flatten_up_to(updates)
        sub = {path: u_leaves[i] for i, path in chosen}
        sub_params = {path: leaves[i] for i, path in chosen}
        stepped = inner.fused_step(sub, state, sub_params, grad_scale)  # type: ignore[misc]
        if stepped is None:
            return None
        new_sub, state = stepped
        new = [new_sub[path] for _, path in chosen]
        same = all(a is b for a, b in zip(new, leaves))
        return (params if same else optree.tree_unflatten(spec, new)), state

    return GradientTransformation(init, update, fused_step if inner.fused_step else None)


def chooser(mask: MaskSpec) -> Callable[[Tree], tuple[list[Tensor], Any, list[tuple[int, str]]]]:
    """A function of a tree: its leaves, their spec and ``(index, dotted_path)`` of the leaves
    ``mask`` chooses, worked out once per tree structure and leaf shapes, then reused."""
    selections: dict[Any, list[tuple[int, str]]] = {}

    def choose(tree: Tree) -> list[tuple[int, str]]:
        chosen = set(_selected(mask, tree))
        return [(i, p) for i, p in enumerate(flatten(tree)) if p in chosen]

    def select(tree: Tree) -> tuple[list[Tensor], Any, list[tuple[int, str]]]:
        leaves, spec = optree.tree_flatten(tree)
        if is_compiling():  # traced once per graph; dynamo cannot hash a PyTreeSpec
            return leaves, spec, choose(tree)
        key = (spec, tuple(tuple(x.shape) for x in leaves))
        if key not in selections:
            selections[key] = choose(tree)
        return leaves, spec, selections[key]

    return select
