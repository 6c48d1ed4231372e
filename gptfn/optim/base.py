"""The optimizer contract (optax's): ``GradientTransformation(init, update)`` over parameter trees.

``state = tx.init(params)``; ``updates, state = tx.update(grads, state, params)``;
``params = apply_updates(params, updates)``. Transforms are pure: nothing passed in is mutated.

Leaf arithmetic goes through :func:`leaf_ops`: in eager code it uses the fused
``torch._foreach_*`` kernels (one call for all leaves); under ``vmap``/``grad``/``jvp``, when a
hyper-parameter requires grad, or while ``torch.compile`` traces, it runs leaf by leaf: the
foreach ops have no batching rule, fail when differentiated with respect to a tensor learning
rate, and their scalar arguments would break a compiled graph. Both paths give equal numbers.

Scalars that the optimizer computes itself (Adam's bias corrections, schedule values) are
computed in float64 (:func:`scalar_dtype`), whatever the params' dtype, and enter each leaf's
arithmetic in that leaf's dtype: float32 params get float32 updates, float64 params lose nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import optree
import torch
from torch import Tensor

from gptfn.tracing import inside_transform, is_compiling
from gptfn.tree import Tree

Scalar = float | Tensor
Schedule = Callable[[Tensor], Tensor]
"""A function of the 0-d step count (a tensor) returning a 0-d tensor; gptfn's schedules return
float64, and their consumers cast the value to the params' dtype."""


class _Init(Protocol):
    def __call__(self, params: Tree) -> Tree: ...


class _Update(Protocol):
    def __call__(
        self, updates: Tree, state: Tree, params: Tree | None = None
    ) -> tuple[Tree, Tree]: ...


class GradientTransformation(NamedTuple):
    """A pair of pure functions: ``init(params) -> state`` and
    ``update(updates, state, params=None) -> (new_updates, new_state)``."""

    init: _Init
    update: _Update


_FOREACH = True


def set_foreach(enabled: bool) -> bool:
    """Allow (default) or forbid the fused foreach path; returns the previous setting."""
    global _FOREACH
    previous, _FOREACH = _FOREACH, bool(enabled)
    return previous


def scalar_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of scalars the optimizer computes (bias corrections, schedules): float64,
    the widest float, except on Apple's MPS, which has none (float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _traced(*values: Any) -> bool:
    """Inside a transform, under compile, or a hyper-parameter that needs grad."""
    if is_compiling() or inside_transform():
        return True
    return any(isinstance(v, Tensor) and v.requires_grad for v in values)


class LeafOps:
    """Arithmetic on equal-length lists of tensors; ``fused`` selects the foreach kernels."""

    def __init__(self, fused: bool) -> None:
        self.fused = fused

    @staticmethod
    def _num(s: Scalar) -> Scalar:
        return s.item() if isinstance(s, Tensor) else s

    @staticmethod
    def _like(s: Scalar, x: Tensor) -> Scalar:
        """A tensor scalar in ``x``'s dtype (a float64 schedule value must not promote a
        batched float32 leaf under ``vmap``); numbers pass through."""
        return s.to(x.dtype) if isinstance(s, Tensor) and s.dtype != x.dtype else s

    def add(self, xs: list[Tensor], ys: list[Tensor], alpha: Scalar = 1.0) -> list[Tensor]:
        """xs + alpha * ys."""
        if self.fused and xs:
            return torch._foreach_add(xs, ys, alpha=self._num(alpha))
        return [x + self._like(alpha, y) * y for x, y in zip(xs, ys)]

    def scale(self, xs: list[Tensor], s: Scalar) -> list[Tensor]:
        """s * xs for a scalar s."""
        if self.fused and xs:
            return torch._foreach_mul(xs, self._num(s))
        return [x * self._like(s, x) for x in xs]

    def mul(self, xs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
        """Elementwise xs * ys."""
        if self.fused and xs:
            return torch._foreach_mul(xs, ys)
        return [x * y for x, y in zip(xs, ys)]

    def lerp(self, xs: list[Tensor], ys: list[Tensor], weight: Scalar) -> list[Tensor]:
        """xs + weight * (ys - xs): an exponential moving average step."""
        if self.fused and xs:
            return torch._foreach_lerp(xs, ys, self._num(weight))
        return [x + self._like(weight, x) * (y - x) for x, y in zip(xs, ys)]

    def lerp_square(self, xs: list[Tensor], ys: list[Tensor], weight: Scalar) -> list[Tensor]:
        """xs + weight * (ys**2 - xs): a moving average of squares."""
        if self.fused and xs:
            out = torch._foreach_mul(xs, 1 - self._num(weight))  # a fresh tensor: ours to update
            torch._foreach_addcmul_(out, ys, ys, self._num(weight))
            return out
        return [x + self._like(weight, x) * (y * y - x) for x, y in zip(xs, ys)]

    def adam_direction(
        self, mu: list[Tensor], nu: list[Tensor], c1: Scalar, c2: Scalar, eps: Scalar
    ) -> list[Tensor]:
        """(mu / c1) / (sqrt(nu / c2) + eps), with c1, c2 the bias corrections."""
        if self.fused and mu:
            denom = torch._foreach_sqrt(nu)  # fresh tensors, updated in place below
            torch._foreach_div_(denom, math.sqrt(self._num(c2)))
            torch._foreach_add_(denom, self._num(eps))
            out = torch._foreach_div(mu, denom)
            torch._foreach_div_(out, self._num(c1))
            return out
        like = self._like
        return [(m / like(c1, m)) / ((v / like(c2, v)).sqrt() + eps) for m, v in zip(mu, nu)]

    def sign(self, xs: list[Tensor]) -> list[Tensor]:
        """Elementwise sign."""
        if self.fused and xs:
            return torch._foreach_sign(xs)
        return [x.sign() for x in xs]

    def norm(self, xs: list[Tensor]) -> Tensor:
        """Global L2 norm of all the tensors together (0-d, float32 accumulation)."""
        if not xs:
            return torch.zeros(())
        if self.fused and xs:
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(xs)))
        return torch.linalg.vector_norm(torch.stack([x.norm() for x in xs]))


def leaf_ops(*hyperparams: Any) -> LeafOps:
    """The fused ops unless a torch.func transform is active, a hyper-parameter needs grad, or
    ``torch.compile`` is tracing (it fuses the leaf-by-leaf ops itself, without graph breaks)."""
    fused = _FOREACH and not _traced(*hyperparams)
    return LeafOps(fused=fused)


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """New params ``params + updates`` (updates cast to each param's dtype); inputs untouched."""
    p_leaves, spec = optree.tree_flatten(params)
    u_leaves = spec.flatten_up_to(updates)
    u_leaves = [u.to(p.dtype) for p, u in zip(p_leaves, u_leaves)]
    return optree.tree_unflatten(spec, leaf_ops().add(p_leaves, u_leaves))
