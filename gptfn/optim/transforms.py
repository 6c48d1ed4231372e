"""Building blocks: each returns a ``GradientTransformation``; ``chain`` them into optimizers.

States are dicts of tensors (a 0-d ``count`` and trees shaped like the params), so they
checkpoint under readable paths and batch under ``vmap``.
"""

from __future__ import annotations

import math
from typing import Any

import optree
import torch
from torch import Tensor

from gptfn.optim.base import GradientTransformation, Scalar, Schedule, leaf_ops

__all__ = [
    "identity",
    "set_to_zero",
    "scale",
    "scale_by_schedule",
    "scale_by_learning_rate",
    "scale_by_adam",
    "add_decayed_weights",
    "clip_by_global_norm",
    "trace",
    "scale_by_lion",
    "scale_by_muon",
    "newton_schulz",
]

Tree = Any


def _count() -> Tensor:
    return torch.zeros((), dtype=torch.int64)


def _zeros(params: Tree) -> Tree:
    return optree.tree_map(torch.zeros_like, params)


def _map_leaves(fn: Any, tree: Tree, *rest: Tree) -> Tree:
    """Flatten ``tree`` (and trees of the same structure), apply ``fn`` to leaf lists, unflatten."""
    leaves, spec = optree.tree_flatten(tree)
    outs = fn(leaves, *[spec.flatten_up_to(r) for r in rest])
    if isinstance(outs, tuple) and outs and isinstance(outs[0], (list, tuple)):  # several lists
        return tuple(optree.tree_unflatten(spec, out) for out in outs)
    return optree.tree_unflatten(spec, outs)


def identity() -> GradientTransformation:
    """Leave updates unchanged."""
    return GradientTransformation(lambda params: {}, lambda u, s, p=None: (u, s))


def set_to_zero() -> GradientTransformation:
    """Replace updates by zeros (with ``masked``: freeze those leaves)."""

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        return optree.tree_map(torch.zeros_like, updates), state

    return GradientTransformation(lambda params: {}, update)


def scale(step_size: Scalar) -> GradientTransformation:
    """Multiply updates by a constant."""

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        return _map_leaves(lambda u: leaf_ops(step_size).scale(u, step_size), updates), state

    return GradientTransformation(lambda params: {}, update)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply updates by ``schedule(count)``; ``count`` starts at 0 and counts updates."""

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        factor = schedule(state["count"])
        scaled = _map_leaves(lambda u: leaf_ops(factor).scale(u, factor), updates)
        return scaled, {"count": state["count"] + 1}

    return GradientTransformation(lambda params: {"count": _count()}, update)


def scale_by_learning_rate(learning_rate: Scalar | Schedule) -> GradientTransformation:
    """Multiply by ``-learning_rate`` (a number or a schedule): descent."""
    if callable(learning_rate):
        return scale_by_schedule(lambda count: -learning_rate(count))
    return scale(-learning_rate)


def scale_by_adam(
    b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8
) -> GradientTransformation:
    """Adam's direction: bias-corrected first moment over the root of the second (Kingma & Ba)."""

    def init(params: Tree) -> Tree:
        return {"count": _count(), "mu": _zeros(params), "nu": _zeros(params)}

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        count = state["count"] + 1
        ops = leaf_ops(b1, b2, eps)

        def step(g: list[Tensor], mu: list[Tensor], nu: list[Tensor]):
            mu = ops.lerp(mu, g, 1 - b1)
            nu = ops.lerp_square(nu, g, 1 - b2)
            c1, c2 = 1 - b1**count, 1 - b2**count
            return ops.adam_direction(mu, nu, c1, c2, eps), mu, nu

        out, mu, nu = _map_leaves(step, updates, state["mu"], state["nu"])
        return out, {"count": count, "mu": mu, "nu": nu}

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: Scalar = 0.0) -> GradientTransformation:
    """Add ``weight_decay * params`` (decoupled weight decay once scaled by -lr; use ``masked``
    to restrict it to some leaves)."""

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        ops = leaf_ops(weight_decay)
        return _map_leaves(lambda u, p: ops.add(u, p, weight_decay), updates, params), state

    return GradientTransformation(lambda params: {}, update)


def clip_by_global_norm(max_norm: Scalar) -> GradientTransformation:
    """Scale updates so their global L2 norm is at most ``max_norm``
    (the coefficient of ``torch.nn.utils.clip_grad_norm_``: max_norm / (norm + 1e-6), at most 1)."""

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        ops = leaf_ops(max_norm)

        def clip(u: list[Tensor]) -> list[Tensor]:
            coef = torch.clamp(max_norm / (ops.norm(u) + 1e-6), max=1.0)
            return (
                [x * coef.to(x.dtype) for x in u] if not ops.fused else torch._foreach_mul(u, coef)
            )

        return _map_leaves(clip, updates), state

    return GradientTransformation(lambda params: {}, update)


def trace(decay: Scalar, nesterov: bool = False) -> GradientTransformation:
    """Momentum: ``m = g + decay * m``; the update is ``m`` (or ``g + decay * m`` for Nesterov),
    as ``torch.optim.SGD`` with dampening 0."""

    def init(params: Tree) -> Tree:
        return {"momentum": _zeros(params)}

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        ops = leaf_ops(decay)

        def step(g: list[Tensor], m: list[Tensor]):
            m = ops.add(g, m, decay)
            return (ops.add(g, m, decay) if nesterov else m), m

        out, m = _map_leaves(step, updates, state["momentum"])
        return out, {"momentum": m}

    return GradientTransformation(init, update)


def scale_by_lion(b1: Scalar = 0.9, b2: Scalar = 0.99) -> GradientTransformation:
    """Lion (Chen et al., 2023): the sign of an interpolation of momentum and gradient."""

    def init(params: Tree) -> Tree:
        return {"mu": _zeros(params)}

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        ops = leaf_ops(b1, b2)

        def step(g: list[Tensor], mu: list[Tensor]):
            return ops.sign(ops.lerp(mu, g, 1 - b1)), ops.lerp(mu, g, 1 - b2)

        out, mu = _map_leaves(step, updates, state["mu"])
        return out, {"mu": mu}

    return GradientTransformation(init, update)


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise a matrix (U V^T of its SVD) with the quintic Newton–Schulz
    iteration of Muon (coefficients 3.4445, -4.7750, 2.0315; Jordan et al., 2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def _as_matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """2-D view of a weight: of the splits of its axes into (rows, cols), the most square one.

    For gptfn's [d, h, k] query weights that is [d, h*k]; for [h, k, d] output weights [h*k, d].
    """
    splits = [(math.prod(shape[:i]), math.prod(shape[i:])) for i in range(1, len(shape))]
    return min(splits, key=lambda rc: abs(math.log(rc[0] / rc[1])))


def scale_by_muon(
    momentum: Scalar = 0.95, nesterov: bool = True, ns_steps: int = 5
) -> GradientTransformation:
    """Muon (Jordan et al., 2024): momentum, then Newton–Schulz orthogonalisation of each
    >=2-D leaf viewed as a matrix, scaled by sqrt(max(1, rows/cols)). Use on hidden matrices."""

    def init(params: Tree) -> Tree:
        return {"momentum": _zeros(params)}

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        ops = leaf_ops(momentum)

        def step(g: list[Tensor], m: list[Tensor]):
            m = ops.add(g, m, momentum)
            direction = ops.add(g, m, momentum) if nesterov else m
            out = []
            for d in direction:
                rows, cols = _as_matrix_shape(d.shape)
                o = newton_schulz(d.reshape(rows, cols), ns_steps)
                out.append((o * max(1.0, rows / cols) ** 0.5).reshape(d.shape).to(d.dtype))
            return out, m

        out, m = _map_leaves(step, updates, state["momentum"])
        return out, {"momentum": m}

    return GradientTransformation(init, update)
