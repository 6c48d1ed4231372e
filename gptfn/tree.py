"""Parameter-tree utilities on optree: paths, flat dicts, stacking, norms, casts.

A tree is nested dicts and lists with tensor leaves. Paths are dotted strings such as
``"blocks.0.attn.w_q"``; list indices become digits. optree sorts dict keys when flattening, so
every function here is deterministic in its leaf order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor

Tree = Any


def _path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(key) for key in path)


def leaves(tree: Tree) -> list[Tensor]:
    """The tensor leaves of ``tree`` in optree's (sorted-key) order."""
    return optree.tree_leaves(tree, none_is_leaf=False)


def param_count(tree: Tree) -> int:
    """Total number of scalar entries over all leaves."""
    return sum(leaf.numel() for leaf in leaves(tree))


def global_norm(tree: Tree) -> Tensor:
    """L2 norm of all leaves taken together (as in gradient clipping), as a 0-d float32 tensor."""
    squares = [leaf.float().pow(2).sum() for leaf in leaves(tree)]
    if not squares:
        return torch.zeros(())
    return torch.stack(squares).sum().sqrt()


def map_with_path(fn: Callable[[str, Tensor], Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn(dotted_path, leaf, *other_leaves)`` to every leaf; same structure out."""
    return optree.tree_map_with_path(lambda path, *xs: fn(_path_str(path), *xs), tree, *rest)


def flatten(tree: Tree) -> dict[str, Tensor]:
    """A flat ``{"dotted.path": leaf}`` dict (the key layout of ``GPTModule.state_dict()``)."""
    paths, values, _ = optree.tree_flatten_with_path(tree)
    return {_path_str(path): value for path, value in zip(paths, values)}


def unflatten(flat: dict[str, Tensor]) -> Tree:
    """Inverse of :func:`flatten`: nested dicts, with all-digit sibling keys ``0..n-1`` as lists."""
    root: dict[str, Any] = {}
    for path, value in flat.items():
        node = root
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} runs through a leaf at {key!r}")
        if last in node:
            raise ValueError(f"path {path!r} names a subtree and a leaf at once")
        node[last] = value
    return _lists_from_digit_dicts(root)


def _lists_from_digit_dicts(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    children = {key: _lists_from_digit_dicts(value) for key, value in node.items()}
    if children and all(key.isdigit() for key in children):
        indices = sorted(int(key) for key in children)
        if indices != list(range(len(indices))):
            raise ValueError(f"list indices {indices} are not 0..{len(indices) - 1}")
        return [children[str(i)] for i in indices]
    return children


def stack(trees: Sequence[Tree]) -> Tree:
    """Stack same-structured trees along a new leading axis (an ensemble for ``vmap``)."""
    if not trees:
        raise ValueError("stack needs at least one tree")
    return optree.tree_map(lambda *xs: torch.stack(xs), *trees)


def unstack(tree: Tree) -> list[Tree]:
    """Split a stacked tree along its leading axis into a list of trees."""
    sizes = {leaf.shape[0] for leaf in leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"leaves disagree on the leading (stack) axis: sizes {sorted(sizes)}")
    (n,) = sizes
    return [optree.tree_map(lambda x, i=i: x[i], tree) for i in range(n)]


def cast(tree: Tree, dtype: torch.dtype) -> Tree:
    """Cast floating-point leaves to ``dtype``; integer leaves are left as they are."""
    return optree.tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, tree)


def zeros_like(tree: Tree) -> Tree:
    """A tree of zeros with the structure, shapes and dtypes of ``tree``."""
    return optree.tree_map(torch.zeros_like, tree)


def register_static(cls: type, name: str) -> None:
    """Make instances of ``cls`` static data in a tree: a node with no children (the value is
    the node's metadata), in optree's global registry and in ``torch.utils._pytree`` (as
    ``name``), so tree maps, ``vmap``, ``grad``, optimizers and checkpoints see tensors only
    and rebuild the value untouched."""
    optree.register_pytree_node(
        cls,
        lambda value: ((), value, ()),
        lambda value, _children: value,
        namespace=getattr(optree.registry, "__GLOBAL_NAMESPACE"),
    )
    torch_pytree.register_pytree_node(
        cls, lambda value: ([], value), lambda _children, value: value, serialized_type_name=name
    )
