"""Combinators: ``chain`` transforms in sequence, ``masked`` to apply one to part of a tree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
from torch import Tensor

from gptfn.optim.base import GradientTransformation
from gptfn.tree import flatten

__all__ = ["chain", "masked", "MaskSpec"]

Tree = Any
MaskSpec = Tree | Callable[[str, Tensor], bool]
"""A boolean tree shaped like the params, or a predicate ``(dotted_path, leaf) -> bool``."""


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after another; the state is the tuple of their states."""

    def init(params: Tree) -> Tree:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        new_state = []
        for t, s in zip(transforms, state, strict=True):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


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
    leaves, so masked state checkpoints under the same paths as the params.
    """

    def pick(tree: Tree, paths: list[str]) -> dict[str, Tensor]:
        flat = flatten(tree)
        return {p: flat[p] for p in paths}

    def init(params: Tree) -> Tree:
        return inner.init(pick(params, _selected(mask, params)))

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        structure = updates if params is None else params
        paths = _selected(mask, structure)
        sub_params = None if params is None else pick(params, paths)
        new_sub, state = inner.update(pick(updates, paths), state, sub_params)
        merged = flatten(updates) | new_sub
        spec = optree.tree_structure(updates)
        return optree.tree_unflatten(spec, [merged[p] for p in flatten(updates)]), state

    return GradientTransformation(init, update)
