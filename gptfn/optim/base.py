"""The optimizer contract (optax's): ``GradientTransformation(init, update)`` over parameter trees.

``state = tx.init(params)``; ``updates, state = tx.update(grads, state, params)``;
``params = apply_updates(params, updates)``. Transforms are pure: nothing passed in is mutated,
except inside :func:`donated`, where the updates, the state and the params passed in are given
up (as JAX's donated buffers) and the common transforms update them in place.
``params, state = update_and_apply(tx, grads, state, params)`` is both steps at once: a
transform with a ``fused_step`` (``adamw``) then runs as ``torch.optim.AdamW(fused=True)``
does, one kernel pass per leaf, where the kernel applies (eager, CPU, float32/float64).

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

import contextlib
import math
from collections.abc import Callable, Iterator
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


class _FusedStep(Protocol):
    def __call__(
        self, updates: Tree, state: Tree, params: Tree, grad_scale: Tensor | None = None
    ) -> tuple[Tree, Tree] | None: ...


class GradientTransformation(NamedTuple):
    """A pair of pure functions: ``init(params) -> state`` and
    ``update(updates, state, params=None) -> (new_updates, new_state)``; optionally
    ``fused_step(updates, state, params, grad_scale=None) -> (new_params, new_state)``, the
    update of ``updates / grad_scale`` and :func:`apply_updates` in one pass per leaf, or None
    where it does not apply (:func:`update_and_apply` calls it)."""

    init: _Init
    update: _Update
    fused_step: _FusedStep | None = None


_FOREACH = True
_DONATED = False


@contextlib.contextmanager
def donated(enabled: bool = True) -> Iterator[None]:
    """Inside, ``tx.update(grads, state, params)`` and ``apply_updates(params, updates)`` may
    overwrite what they are given, as ``torch.optim`` does: ``scale_by_adam`` updates its
    moments in place and writes the direction into the gradients' buffers, ``trace`` (SGD
    momentum) likewise, clipping, weight decay and learning-rate scaling scale the updates in
    place, ``apply_updates`` adds into the params.
    The step then needs no second copy of the params and the moments (for a 1.2 B model in
    float32, 15 GB less at its peak). Use the returned trees; the ones passed in are spent.
    Transforms without an in-place path stay functional, so the results are the same either
    way. Ignored under ``torch.func`` transforms and ``torch.compile`` (nothing is donated).
    ``donated(False)`` turns it off inside, for a transform that still needs the old state
    after its inner update (``loss_scaling`` keeps it on a non-finite step)."""
    global _DONATED
    previous, _DONATED = _DONATED, enabled
    try:
        yield
    finally:
        _DONATED = previous


_KNOWN_NORM: tuple[list[Tensor], list[int], Tensor] | None = None


@contextlib.contextmanager
def known_norm(leaves: list[Tensor], value: Tensor) -> Iterator[None]:
    """Inside, :meth:`LeafOps.norm` of exactly these tensors, none modified since (their
    version counters unchanged), is ``value`` without a second pass: the train step logs the
    gradients' norm and clipping needs the same one (~0.1 ms of a small model's step)."""
    global _KNOWN_NORM
    previous, _KNOWN_NORM = _KNOWN_NORM, (list(leaves), [x._version for x in leaves], value)
    try:
        yield
    finally:
        _KNOWN_NORM = previous


def _known(xs: list[Tensor]) -> Tensor | None:
    if _KNOWN_NORM is None:
        return None
    leaves, versions, value = _KNOWN_NORM
    same = len(xs) == len(leaves) and all(a is b for a, b in zip(xs, leaves))
    return value if same and [x._version for x in xs] == versions else None


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

    def __init__(self, fused: bool, in_place: bool = False) -> None:
        self.fused = fused
        self.in_place = in_place

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

    # The ``*_`` variants: the caller no longer needs the first list; inside ``donated()`` it is
    # overwritten and returned, otherwise they equal the functional ops (same kernels).

    def add_(self, xs: list[Tensor], ys: list[Tensor], alpha: Scalar = 1.0) -> list[Tensor]:
        """xs + alpha * ys, into xs when donated."""
        if not (self.in_place and xs):
            return self.add(xs, ys, alpha)
        if self.fused:
            torch._foreach_add_(xs, ys, alpha=self._num(alpha))
        else:
            for x, y in zip(xs, ys):
                x.add_(self._like(alpha, y) * y)
        return xs

    def scale_(self, xs: list[Tensor], s: Scalar) -> list[Tensor]:
        """s * xs, into xs when donated."""
        if not (self.in_place and xs):
            return self.scale(xs, s)
        if self.fused:
            s = self._num(s)
            if s != 1.0:  # an unclipped step: x * 1 is x, so no pass over the leaves
                torch._foreach_mul_(xs, s)
        else:
            for x in xs:
                x.mul_(self._like(s, x))
        return xs

    def lerp_(self, xs: list[Tensor], ys: list[Tensor], weight: Scalar) -> list[Tensor]:
        """:meth:`lerp`, into xs when donated."""
        if not (self.in_place and xs):
            return self.lerp(xs, ys, weight)
        if self.fused:
            torch._foreach_lerp_(xs, ys, self._num(weight))
        else:
            for x, y in zip(xs, ys):
                x.add_(self._like(weight, x) * (y - x))
        return xs

    def lerp_square_(self, xs: list[Tensor], ys: list[Tensor], weight: Scalar) -> list[Tensor]:
        """:meth:`lerp_square`, into xs when donated."""
        if not (self.in_place and xs):
            return self.lerp_square(xs, ys, weight)
        if self.fused:
            torch._foreach_mul_(xs, 1 - self._num(weight))
            torch._foreach_addcmul_(xs, ys, ys, self._num(weight))
        else:
            for x, y in zip(xs, ys):
                x.add_(self._like(weight, x) * (y * y - x))
        return xs

    def trace_(
        self, gs: list[Tensor], ms: list[Tensor], decay: Scalar, nesterov: bool
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Momentum ``m = g + decay * m`` and the direction (``m``, or ``g + decay * m`` with
        ``nesterov``); when donated, ``m`` in place and the direction into ``gs`` (never the
        same tensor as the state, so a later in-place step cannot change the momentum)."""
        if not (self.in_place and gs):
            ms = self.add(gs, ms, decay)
            return (self.add(gs, ms, decay) if nesterov else ms), ms
        alpha = self._num(decay) if self.fused else None
        for g, m in zip(gs, ms):  # the same kernels as add(): g + decay * m
            a = self._like(decay, m) if alpha is None else alpha
            if self.fused:
                torch.add(g, m, alpha=a, out=m)
            else:
                torch.add(g, a * m, out=m)
            if nesterov:
                torch.add(g, m, alpha=a, out=g) if self.fused else torch.add(g, a * m, out=g)
            else:
                g.copy_(m)
        return gs, ms

    def adam_direction_(
        self,
        out: list[Tensor],
        mu: list[Tensor],
        nu: list[Tensor],
        c1: Scalar,
        c2: Scalar,
        eps: Scalar,
    ) -> list[Tensor]:
        """:meth:`adam_direction`, written into ``out`` (the spent gradients) when donated: the
        same operations as the functional path, so the same numbers."""
        if not (self.in_place and mu):
            return self.adam_direction(mu, nu, c1, c2, eps)
        if not self.fused:
            for o, m, v in zip(out, mu, nu):
                torch.div(v, self._like(c2, v), out=o)
                torch.div(m / self._like(c1, m), o.sqrt_().add_(eps), out=o)
            return out
        torch._foreach_copy_(out, nu)
        torch._foreach_sqrt_(out)
        torch._foreach_div_(out, math.sqrt(self._num(c2)))
        torch._foreach_add_(out, self._num(eps))
        for o, m in zip(out, mu):  # mu / denom into denom's buffer: no foreach op does that
            torch.div(m, o, out=o)
        torch._foreach_div_(out, self._num(c1))
        return out

    def adam_fused(
        self, g: list[Tensor], mu: list[Tensor], nu: list[Tensor], hyper: tuple, count: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]] | None:
        """Adam's moments and direction ``(direction, mu, nu)`` in one pass per leaf, by torch's
        fused CPU AdamW kernel; ``hyper`` is ``(b1, b2, eps)``. None where that kernel does not
        apply: unfused ops, tensor hyper-parameters, leaves off the CPU or not float32/float64
        (bfloat16 would round once where the unfused path rounds per op).

        The kernel's "parameter" is the gradient buffer itself: with learning rate -1 and
        weight decay -1 it first scales the parameter by ``1 - lr * wd = 0`` and then subtracts
        ``lr`` times the direction, so the direction replaces the gradient it was computed from
        (the kernel reads each element's gradient before it writes there; a test checks this
        bit for bit against a separate zero buffer). Donated, that is the spent gradients; else
        a copy. Moments and direction agree with the unfused path's to a few float32 ulps.
        Measured on nanoGPT's 4 x 128 recipe (2 threads): the optimizer step 2.3 ms against 3.0
        with the nine foreach passes, and 0.6 ms less again without a zeroed scratch buffer."""
        if not self._kernel_takes(hyper, count, g, mu, nu):
            return None
        if not self.in_place:  # fresh moments and direction; nothing given is touched
            g = [x.clone() for x in g]  # clone keeps a dense tensor's strides
            mu, nu = list(torch._foreach_mul(mu, 1.0)), list(torch._foreach_mul(nu, 1.0))
        b1, b2, eps = (float(h) for h in hyper)
        step = [count.to(torch.float32)] * len(g)
        torch._fused_adamw_(
            g, g, mu, nu, [], step, lr=-1.0, beta1=b1, beta2=b2, weight_decay=-1.0, eps=eps,
            amsgrad=False, maximize=False,
        )  # fmt: skip
        return g, mu, nu

    def adamw_applied(
        self,
        params: list[Tensor],
        g: list[Tensor],
        mu: list[Tensor],
        nu: list[Tensor],
        hyper: tuple,
        count: Tensor,
        decayed: list[bool],
        grad_scale: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]] | None:
        """AdamW's whole step ``(params, mu, nu)``, the update applied, in one pass per leaf:
        torch's fused CPU AdamW kernel on the params themselves (``torch.optim.AdamW(fused=
        True)``), ``hyper`` being ``(b1, b2, eps, learning_rate, weight_decay)`` and the decay
        on the ``decayed`` leaves only, of the gradients divided by ``grad_scale`` (a 0-d
        float32 tensor: clipping, without a pass of its own). None where :meth:`adam_fused`
        would be None or the learning rate or decay is a tensor. Donated, params and moments
        are updated where they lie (and, with ``grad_scale``, the gradients divided); else
        copies are.

        Against the chain of passes (Adam's direction, the decay, the learning rate, the
        update applied: four passes over each leaf, and their Python) the params agree to a
        few float32 ulps. On nanoGPT's 4 x 128 model (2 threads), with the clip as divisor:
        0.93 ms a step against 1.7 ms (``experiments/bench_optimizer.py``)."""
        if not self._kernel_takes(hyper, count, params, g, mu, nu):
            return None
        if not self.in_place:  # fresh params and moments; nothing given is touched
            params = [x.clone() for x in params]
            mu, nu = [x.clone() for x in mu], [x.clone() for x in nu]
            g = g if grad_scale is None else [x.clone() for x in g]  # the kernel divides them
        b1, b2, eps, lr, wd = (float(h) for h in hyper)
        step = [count.to(torch.float32)] * len(g)
        for rate in {wd if d else 0.0 for d in decayed}:
            pick = [i for i, d in enumerate(decayed) if (wd if d else 0.0) == rate]
            torch._fused_adamw_(
                *([xs[i] for i in pick] for xs in (params, g, mu, nu)), [], step[: len(pick)],
                lr=lr, beta1=b1, beta2=b2, weight_decay=rate, eps=eps, amsgrad=False,
                maximize=False, grad_scale=grad_scale,
            )  # fmt: skip
        return params, mu, nu

    def _kernel_takes(self, hyper: tuple, count: Tensor, *lists: list[Tensor]) -> bool:
        """Whether torch's fused CPU AdamW kernel computes what the unfused ops would: fused
        ops, number hyper-parameters, CPU float32/float64 leaves with one layout per leaf
        across ``lists``, and a step count that float32 holds exactly."""
        first = lists[0]
        if not (self.fused and first) or any(isinstance(h, Tensor) for h in hyper):
            return False
        wide = (torch.float32, torch.float64)
        if count >= 2**24 or any(x.device.type != "cpu" or x.dtype not in wide for x in first):
            return False
        return all(_one_dense_layout(*xs) for xs in zip(*lists))  # it walks memory in order

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
        if self.fused:
            known = _known(xs)
            if known is not None:
                return known
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(xs)))
        return torch.linalg.vector_norm(torch.stack([x.norm() for x in xs]))


def _one_dense_layout(*xs: Tensor) -> bool:
    """Whether the tensors share dtype and strides, and those strides cover their elements
    once without gaps (contiguous up to a permutation of the axes, such as a transpose)."""
    first = xs[0]
    if all(x.dtype == first.dtype and x.is_contiguous() for x in xs):
        return True  # the common case, answered without Python over the axes
    if any(x.dtype != first.dtype or x.stride() != first.stride() for x in xs):
        return False
    expected = 1
    for size, stride in sorted(zip(first.shape, first.stride()), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def leaf_ops(*hyperparams: Any) -> LeafOps:
    """The fused ops unless a torch.func transform is active, a hyper-parameter needs grad, or
    ``torch.compile`` is tracing (it fuses the leaf-by-leaf ops itself, without graph breaks)."""
    traced = _traced(*hyperparams)
    return LeafOps(fused=_FOREACH and not traced, in_place=_DONATED and not traced)


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """New params ``params + updates`` (updates cast to each param's dtype); inputs untouched,
    except inside :func:`donated`, where the sum is written into ``params``."""
    p_leaves, spec = optree.tree_flatten(params)
    u_leaves = spec.flatten_up_to(updates)
    u_leaves = [u.to(p.dtype) for p, u in zip(p_leaves, u_leaves)]
    ops = leaf_ops()
    new = ops.add_(p_leaves, u_leaves)
    return params if ops.in_place and new is p_leaves else optree.tree_unflatten(spec, new)


def update_and_apply(
    tx: GradientTransformation, updates: Tree, state: Tree, params: Tree
) -> tuple[Tree, Tree]:
    """``tx.update`` then :func:`apply_updates`: new ``(params, state)``. A transform with a
    ``fused_step`` (``adamw``, and the optimizer ``gptfn.train.make_optimizer`` builds from
    it) does both in one pass per leaf where it can, as ``torch.optim``'s fused AdamW, to a
    few float32 ulps of the separate update; elsewhere (a torch.func transform, compile,
    other dtypes or devices) it is the update and the sum."""
    if tx.fused_step is not None:
        stepped = tx.fused_step(updates, state, params)
        if stepped is not None:
            return stepped
    updates, state = tx.update(updates, state, params)
    return apply_updates(params, updates), state
