"""Building blocks: each returns a ``GradientTransformation``; ``chain`` them into optimizers.

States are dicts of tensors (a 0-d ``count`` and trees shaped like the params), so they
checkpoint under readable paths and batch under ``vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import optree
import torch
from torch import Tensor

from gptfn.optim.base import GradientTransformation, Scalar, Schedule, leaf_ops, scalar_dtype
from gptfn.tree import Tree, flatten


def _count() -> Tensor:
    return torch.zeros((), dtype=torch.int64)


def _zeros(params: Tree) -> Tree:
    return optree.tree_map(torch.zeros_like, params)


def _map_leaves(fn: Any, tree: Tree, *rest: Tree) -> Tree:
    """Flatten ``tree`` (and trees of the same structure), apply ``fn`` to leaf lists, unflatten.
    An output list holding exactly an input tree's leaves (updated in place, when donated)
    returns that tree: rebuilding it cost ~40 us a time, ~0.5 ms of a small model's step."""
    trees = (tree, *rest)
    leaves, spec = optree.tree_flatten(tree)
    inputs = [leaves, *[spec.flatten_up_to(r) for r in rest]]

    def build(out: list[Tensor]) -> Tree:
        for given, original in zip(inputs, trees):
            if len(out) == len(given) and all(a is b for a, b in zip(out, given)):
                return original
        return optree.tree_unflatten(spec, out)

    outs = fn(*[list(x) for x in inputs])
    if isinstance(outs, tuple) and outs and isinstance(outs[0], (list, tuple)):  # several lists
        return tuple(build(out) for out in outs)
    return build(outs)


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
        return _map_leaves(lambda u: leaf_ops(step_size).scale_(u, step_size), updates), state

    return GradientTransformation(lambda params: {}, update)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply updates by ``schedule(count)``; ``count`` starts at 0 and counts updates. The
    schedule's value (float64) is cast to each leaf's dtype."""

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        factor = schedule(state["count"])
        scaled = _map_leaves(lambda u: leaf_ops(factor).scale_(u, factor), updates)
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
    """Adam's direction (Kingma & Ba, 2015): the bias-corrected first moment over the root of
    the bias-corrected second moment.

    The bias corrections ``1 - b1**t`` and ``1 - b2**t`` are computed in float64 (see
    :func:`gptfn.optim.base.scalar_dtype`), as ``torch.optim.Adam`` and optax do with Python
    or float64 scalars; float32 would put them off by up to ~1e-5 relative with ``b2 = 0.999``.

    Args:
      b1: Decay rate of the moving average of gradients (first moment).
      b2: Decay rate of the moving average of squared gradients (second moment).
      eps: Added to the root of the corrected second moment (outside the root, as in torch
        and optax).

    Returns:
      A ``GradientTransformation`` whose state is ``{"count", "mu", "nu"}``.
    """

    def init(params: Tree) -> Tree:
        return {"count": _count(), "mu": _zeros(params), "nu": _zeros(params)}

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        count = state["count"] + 1
        t = count.to(scalar_dtype(count.device))  # the bias corrections in float64
        c1, c2 = 1 - b1**t, 1 - b2**t
        ops = leaf_ops(b1, b2, eps)

        def step(g: list[Tensor], mu: list[Tensor], nu: list[Tensor]):
            fused = ops.adam_fused(g, mu, nu, (b1, b2, eps), count)
            if fused is not None:  # one pass per leaf (CPU, float32/64)
                return fused
            mu = ops.lerp_(mu, g, 1 - b1)  # in place only inside gptfn.optim.donated()
            nu = ops.lerp_square_(nu, g, 1 - b2)
            return ops.adam_direction_(g, mu, nu, c1, c2, eps), mu, nu

        out, mu, nu = _map_leaves(step, updates, state["mu"], state["nu"])
        return out, {"count": count, "mu": mu, "nu": nu}

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: Scalar = 0.0) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates: decoupled weight decay (Loshchilov &
    Hutter) once a later ``scale_by_learning_rate`` multiplies by -lr. It decays every leaf it
    sees; ``masked`` restricts it (``adamw`` and ``lion`` decay only >=2-D leaves by default)."""

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        ops = leaf_ops(weight_decay)
        return _map_leaves(lambda u, p: ops.add_(u, p, weight_decay), updates, params), state

    return GradientTransformation(lambda params: {}, update)


def clip_by_global_norm(max_norm: Scalar) -> GradientTransformation:
    """Scale updates so their global L2 norm is at most ``max_norm``.

    Differs from optax on purpose: the factor is ``torch.nn.utils.clip_grad_norm_``'s,
    ``min(1, max_norm / (norm + 1e-6))`` (optax uses ``max_norm / norm`` when ``norm >
    max_norm``), so gptfn and ``torch.optim`` loops clip identically; the two differ by a
    relative ~1e-6 / norm."""

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        ops = leaf_ops(max_norm)

        def clip(u: list[Tensor]) -> list[Tensor]:
            coef = clip_factor(ops.norm(u), max_norm)
            if ops.in_place:  # donated: scale the spent updates where they lie
                return ops.scale_(u, coef)
            return (
                [x * coef.to(x.dtype) for x in u] if not ops.fused else torch._foreach_mul(u, coef)
            )

        return _map_leaves(clip, updates), state

    return GradientTransformation(lambda params: {}, update)


def clip_factor(norm: Tensor, max_norm: Scalar) -> Tensor:
    """What :func:`clip_by_global_norm` multiplies updates of global norm ``norm`` by."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def trace(decay: Scalar, nesterov: bool = False) -> GradientTransformation:
    """Momentum as ``torch.optim.SGD`` with dampening 0 (optax's ``trace`` too).

    Args:
      decay: Momentum decay; ``m = g + decay * m``.
      nesterov: Return ``g + decay * m`` instead of ``m``.

    Returns:
      A ``GradientTransformation`` whose state is ``{"momentum"}``.
    """

    def init(params: Tree) -> Tree:
        return {"momentum": _zeros(params)}

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        ops = leaf_ops(decay)

        def step(g: list[Tensor], m: list[Tensor]):
            return ops.trace_(g, m, decay, nesterov)

        out, m = _map_leaves(step, updates, state["momentum"])
        return out, {"momentum": m}

    return GradientTransformation(init, update)


def scale_by_lion(b1: Scalar = 0.9, b2: Scalar = 0.99) -> GradientTransformation:
    """Lion's direction (Chen et al., 2023): the sign of an interpolation of momentum and
    gradient.

    Args:
      b1: Weight of the momentum in the interpolation whose sign is the update.
      b2: Decay rate of the momentum.

    Returns:
      A ``GradientTransformation`` whose state is ``{"mu"}``.
    """

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
    iteration of Muon (coefficients 3.4445, -4.7750, 2.0315; Jordan et al., 2024).

    Args:
      g: A 2-D tensor; the iteration runs in its dtype.
      steps: Newton–Schulz iterations (5 brings the singular values to roughly [0.7, 1.2]).
      eps: Added to the Frobenius norm that ``g`` is first divided by (guards a zero ``g``).

    Returns:
      A tensor of ``g``'s shape. Transposing ``g`` transposes the result.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


FanInAxes = Callable[[str, Tensor], Sequence[int]]
"""``(dotted_path, leaf) -> the axes of the leaf that its input is contracted with``."""


def leading_fan_in_axes(path: str, leaf: Tensor) -> tuple[int, ...]:
    """gptfn's layout rule: the fan-in of a weight is its leading axes.

    gptfn computes ``x @ w`` contracting ``w``'s leading axes, so every weight is stored
    [fan-in axes..., fan-out axes...]: ``w_in`` [d, 4d] and ``w_out`` [4d, d] have fan-in axis
    0. For a leaf with more than two axes, where the boundary lies is not written in the shape;
    this rule puts it where the two sides' sizes are closest (the smallest ratio of the larger
    to the smaller; on a tie, fewer fan-in axes). For attention that is the d_model axis of
    ``w_q``/``w_k``/``w_v`` [d_model, head, d_head] -> fan-in (0,), grouped-query keys and
    values [d_model, kv_head, d_head] included, and the (head, d_head) axes of ``w_o``
    [head, d_head, d_model] -> fan-in (0, 1), whenever d_head <= d_model and head < d_model
    (every real model). The rule reads shapes only, so a new weight in gptfn's layout needs no
    name registered here.
    For other layouts pass your own rule, e.g. torch's [out, in] ``lambda path, leaf: (1,)``,
    or one that looks at ``path``.
    """
    if leaf.ndim < 2:
        raise ValueError(f"{path}: a fan-in needs a >=2-D leaf, got shape {tuple(leaf.shape)}")
    shape = leaf.shape

    def imbalance(split: int) -> Fraction:  # exact, so ties are ties
        sizes = sorted([max(math.prod(shape[:split]), 1), max(math.prod(shape[split:]), 1)])
        return Fraction(sizes[1], sizes[0])

    split = min(range(1, leaf.ndim), key=lambda i: (imbalance(i), i))
    return tuple(range(split))


def _fan_in_of(rule: FanInAxes, path: str, leaf: Tensor) -> tuple[int, ...]:
    """The rule's axes, checked: a non-empty proper subset of the leaf's axes, no repeats."""
    raw = tuple(int(a) for a in rule(path, leaf))
    axes = tuple(a % leaf.ndim for a in raw if -leaf.ndim <= a < leaf.ndim)
    if len(axes) != len(raw) or not axes or len(set(axes)) != len(axes) or len(axes) >= leaf.ndim:
        raise ValueError(
            f"fan_in_axes gave {raw} for {path} of shape {tuple(leaf.shape)}: need a non-empty "
            "proper subset of its axes, without repeats (the rest are the fan-out)"
        )
    return axes


def _orthogonalise(d: Tensor, fan_in: tuple[int, ...], steps: int, eps: float) -> Tensor:
    """Newton–Schulz on ``d`` viewed as a [fan-in, fan-out] matrix, scaled by
    sqrt(max(1, fan_out / fan_in)), in ``d``'s layout. A sharded leaf (a DTensor, under
    FSDP) is gathered whole first and its result cut back to this rank's shard: Newton–Schulz
    needs the whole matrix."""
    if hasattr(d, "full_tensor") and hasattr(d, "placements"):
        from torch.distributed.tensor import distribute_tensor

        whole = _orthogonalise(d.full_tensor(), fan_in, steps, eps)
        return distribute_tensor(whole, d.device_mesh, d.placements, src_data_rank=None)
    fan_out = tuple(a for a in range(d.ndim) if a not in fan_in)
    order = fan_in + fan_out
    x = d.permute(order)
    n_in = math.prod([d.shape[a] for a in fan_in])  # lists, not generators: dynamo traces them
    n_out = math.prod([d.shape[a] for a in fan_out])
    o = newton_schulz(x.reshape(n_in, n_out), steps, eps) * math.sqrt(max(1.0, n_out / n_in))
    inverse = sorted(range(d.ndim), key=order.__getitem__)
    return o.reshape(x.shape).permute(inverse).to(d.dtype)


def scale_by_muon(
    momentum: Scalar | Schedule = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    eps: float = 1e-7,
    fan_in_axes: FanInAxes = leading_fan_in_axes,
) -> GradientTransformation:
    """Muon's direction (Jordan et al., 2024): momentum, then each leaf viewed as a
    [fan-in, fan-out] matrix is orthogonalised by Newton–Schulz and scaled by
    ``sqrt(max(1, fan_out / fan_in))`` (the paper's ``sqrt(max(1, rows / cols))`` for torch's
    [out, in] weights). Apply it to hidden matrices only (``muon`` masks it so).

    The momentum is torch-style, ``m = g + momentum * m`` (update ``g + momentum * m`` with
    Nesterov), where optax keeps an average ``(1 - momentum) * g + momentum * m``; the two
    directions are proportional and Newton–Schulz normalises the scale away, so they agree up
    to ``eps``.

    Args:
      momentum: Momentum decay: a number, or a schedule ``count -> value`` (a warm-up such as
        :func:`~gptfn.optim.linear_schedule` from 0.85 to 0.95, as the modded-nanogpt
        speedrun does).
      nesterov: Orthogonalise ``g + momentum * m`` instead of ``m``.
      ns_steps: Newton–Schulz iterations.
      eps: Newton–Schulz's guard against dividing by a zero norm.
      fan_in_axes: ``(path, leaf) -> axes`` naming each leaf's fan-in; the default,
        :func:`leading_fan_in_axes`, is gptfn's layout. Paths are dotted (``blocks.0.mlp.w_in``).

    Returns:
      A ``GradientTransformation`` whose state is ``{"momentum"}``, and ``"count"`` (the
      updates so far) when ``momentum`` is a schedule.
    """
    scheduled = callable(momentum)

    def init(params: Tree) -> Tree:
        return {"momentum": _zeros(params)} | ({"count": _count()} if scheduled else {})

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        beta = momentum(state["count"]) if scheduled else momentum
        ops = leaf_ops(beta)
        paths = list(flatten(updates))

        def step(g: list[Tensor], m: list[Tensor]):
            m = ops.add(g, m, beta)
            direction = ops.add(g, m, beta) if nesterov else m
            out = [
                _orthogonalise(d, _fan_in_of(fan_in_axes, path, d), ns_steps, eps)
                for path, d in zip(paths, direction)
            ]
            return out, m

        out, m = _map_leaves(step, updates, state["momentum"])
        return out, {"momentum": m} | ({"count": state["count"] + 1} if scheduled else {})

    return GradientTransformation(init, update)
