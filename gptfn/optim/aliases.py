"""Ready-made optimizers built from the transforms, with optax's argument names.

Where gptfn deliberately differs from optax, the docstring says so: ``adamw`` and ``lion``
decay only >=2-D leaves by default (nanoGPT's groups; optax decays every leaf unless masked),
and ``muon``'s momentum is torch-style ``g + beta * m``.
"""

from __future__ import annotations

from typing import Any

import optree
from torch import Tensor

from gptfn.optim.base import GradientTransformation, Scalar, Schedule, leaf_ops
from gptfn.optim.combine import MaskSpec, chain, chooser, masked
from gptfn.optim.transforms import (
    FanInAxes,
    add_decayed_weights,
    leading_fan_in_axes,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_muon,
    trace,
)

LR = Scalar | Schedule


def matrices(path: str, leaf: Tensor) -> bool:
    """Default weight-decay mask (nanoGPT's groups): decay >=2-D leaves, not biases or norms."""
    return leaf.ndim >= 2


def hidden_matrices(path: str, leaf: Tensor) -> bool:
    """Muon's default: >=2-D leaves inside the network, not the (un)embedding tables."""
    return leaf.ndim >= 2 and path.split(".")[0] not in ("wte", "wpe", "unembed")


def _chain(*parts: GradientTransformation | None) -> GradientTransformation:
    return chain(*(p for p in parts if p is not None))


def _decay(weight_decay: Scalar, mask: MaskSpec | None) -> GradientTransformation:
    decay = add_decayed_weights(weight_decay)
    return decay if mask is None else masked(decay, mask)


def sgd(
    learning_rate: LR, momentum: float | None = None, nesterov: bool = False
) -> GradientTransformation:
    """Stochastic gradient descent, optionally with (Nesterov) momentum; equals
    ``torch.optim.SGD`` with ``dampening=0``.

    Args:
      learning_rate: A number, or a schedule of the step count.
      momentum: Momentum decay (``m = g + momentum * m``); None or 0 for none.
      nesterov: Step along ``g + momentum * m`` instead of ``m``.

    Returns:
      A ``GradientTransformation``.

    Examples:
      >>> import torch
      >>> from gptfn.optim import apply_updates, sgd
      >>> params = {"w": torch.ones(2)}
      >>> tx = sgd(0.1, momentum=0.9)
      >>> updates, state = tx.update({"w": torch.ones(2)}, tx.init(params), params)
      >>> apply_updates(params, updates)
      {'w': tensor([0.9000, 0.9000])}
    """
    return _chain(
        trace(momentum, nesterov) if momentum else None, scale_by_learning_rate(learning_rate)
    )


def adamw(
    learning_rate: LR,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-4,
    mask: MaskSpec | None = matrices,
) -> GradientTransformation:
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019); equals
    ``torch.optim.AdamW`` (float64: to 1e-12 over 100 steps) when every leaf is decayed.

    Differs from optax on purpose: by default only >=2-D leaves (``matrices``) are decayed,
    not biases and norm scales, as nanoGPT groups them; ``mask=None`` decays every leaf
    (optax's and torch's default).

    Args:
      learning_rate: A number, or a schedule of the step count.
      b1: Decay rate of the first-moment average.
      b2: Decay rate of the second-moment average.
      eps: Added to the root of the second moment.
      weight_decay: Decoupled decay rate; the step is ``-lr * (adam + weight_decay * p)``.
      mask: Which leaves to decay: a predicate ``(path, leaf) -> bool``, a boolean tree, or
        None for all.

    Returns:
      A ``GradientTransformation``.

    Examples:
      >>> import torch
      >>> from gptfn.optim import adamw, apply_updates
      >>> params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
      >>> tx = adamw(1e-2, weight_decay=0.1)
      >>> grads = {"w": torch.ones(2, 2), "b": torch.ones(2)}
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> round(updates["w"][0, 0].item(), 6), round(updates["b"][0].item(), 6)  # b: no decay
      (-0.011, -0.01)
    """
    adam = scale_by_adam(b1, b2, eps)
    tx = _chain(adam, _decay(weight_decay, mask), scale_by_learning_rate(learning_rate))
    return tx._replace(fused_step=_adamw_step(learning_rate, b1, b2, eps, weight_decay, mask))


def _adamw_step(
    learning_rate: LR,
    b1: Scalar,
    b2: Scalar,
    eps: Scalar,
    weight_decay: Scalar,
    mask: MaskSpec | None,
) -> Any:
    """``adamw``'s update and apply in one kernel pass per leaf (``LeafOps.adamw_applied``),
    on the state of its chain: ``(adam's, the decay's, the learning rate's)``."""
    select = chooser((lambda path, leaf: True) if mask is None else mask)  # the decayed leaves

    def fused_step(updates: Any, state: Any, params: Any, grad_scale: Tensor | None = None) -> Any:
        adam_state, decay_state, lr_state = state
        scheduled = callable(learning_rate)
        rate = learning_rate(lr_state["count"]) if scheduled else learning_rate  # type: ignore[operator]
        ops = leaf_ops(b1, b2, eps, weight_decay, rate)
        if not ops.fused:
            return None
        p_leaves, spec, chosen = select(params)
        decayed = [False] * len(p_leaves)
        for i, _ in chosen:
            decayed[i] = True
        moments = [spec.flatten_up_to(adam_state[k]) for k in ("mu", "nu")]
        count = adam_state["count"] + 1
        hyper = (b1, b2, eps, float(rate), weight_decay)
        out = ops.adamw_applied(
            p_leaves, spec.flatten_up_to(updates), *moments, hyper, count, decayed, grad_scale
        )
        if out is None:
            return None
        if all(a is b for a, b in zip(out[0], p_leaves)):  # donated: updated where they lie
            new_p, mu, nu = params, adam_state["mu"], adam_state["nu"]
        else:
            new_p, mu, nu = (optree.tree_unflatten(spec, xs) for xs in out)
        lr_state = {"count": lr_state["count"] + 1} if scheduled else lr_state
        return new_p, ({"count": count, "mu": mu, "nu": nu}, decay_state, lr_state)

    return fused_step


def lion(
    learning_rate: LR,
    b1: Scalar = 0.9,
    b2: Scalar = 0.99,
    weight_decay: Scalar = 1e-3,
    mask: MaskSpec | None = matrices,
) -> GradientTransformation:
    """Lion (Chen et al., 2023): sign updates with decoupled weight decay; use a ~3-10x smaller
    learning rate than AdamW. Like ``adamw``, decays only ``mask``'d leaves (default >=2-D).

    Args:
      learning_rate: A number, or a schedule of the step count.
      b1: Interpolation between momentum and gradient for the update's sign.
      b2: Decay rate of the momentum.
      weight_decay: Decoupled decay rate.
      mask: Which leaves to decay (as in ``adamw``); None for all.

    Returns:
      A ``GradientTransformation``.
    """
    return _chain(
        scale_by_lion(b1, b2), _decay(weight_decay, mask), scale_by_learning_rate(learning_rate)
    )


def muon(
    learning_rate: LR = 0.02,
    momentum: float | Schedule = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    adam_learning_rate: LR = 3e-3,
    b1: float = 0.9,
    b2: float = 0.95,
    weight_decay: float = 0.0,
    muon_mask: MaskSpec = hidden_matrices,
    eps: float = 1e-7,
    adam_eps: float = 1e-8,
    fan_in_axes: FanInAxes = leading_fan_in_axes,
) -> GradientTransformation:
    """Muon (Jordan et al., 2024) on hidden matrices, AdamW on everything else.

    The ``muon_mask``'d leaves get momentum, Newton–Schulz orthogonalisation and the shape
    scale ``sqrt(max(1, fan_out / fan_in))`` (``scale_by_muon``; fan-in axes in gptfn's [in,
    out] layout), then ``-learning_rate``; the rest (embeddings, biases, norms) get AdamW.
    Unlike optax's ``muon``, the momentum is torch-style ``g + momentum * m``.

    Args:
      learning_rate: Muon's learning rate (number or schedule).
      momentum: Muon's momentum decay (a number, or a schedule of the step count).
      nesterov, ns_steps: Orthogonalise ``g + momentum * m``; Newton–Schulz iterations.
      adam_learning_rate: AdamW's learning rate for the other leaves.
      b1, b2: AdamW's first- and second-moment decays.
      weight_decay: Decoupled weight decay on both parts (AdamW's on its >=2-D leaves only).
      muon_mask: Predicate ``(path, leaf) -> bool`` choosing Muon's leaves.
      eps, adam_eps: Newton–Schulz's guard against a zero norm; AdamW's epsilon.
      fan_in_axes: ``(path, leaf) -> fan-in axes`` for Muon's shape scale; the default is
        gptfn's layout (``leading_fan_in_axes``).

    Returns:
      A ``GradientTransformation``.

    Examples:
      >>> import torch
      >>> from gptfn.optim import muon
      >>> g = torch.Generator().manual_seed(0)
      >>> params = {"wte": torch.randn(10, 4, generator=g), "w_in": torch.randn(4, 16, generator=g)}
      >>> tx = muon(0.02, adam_learning_rate=1e-3, muon_mask=lambda path, leaf: path == "w_in")
      >>> updates, state = tx.update(params, tx.init(params), params)
      >>> s = torch.linalg.svdvals(updates["w_in"] / -0.02)  # fan-in 4, fan-out 16: scale 2
      >>> bool((s > 2 * 0.6).all() and (s < 2 * 1.3).all())
      True
    """
    if not callable(muon_mask):
        raise TypeError("muon_mask must be a predicate (path, leaf) -> bool")

    def rest(path: str, leaf: Any) -> bool:
        return not muon_mask(path, leaf)

    on_matrices = _chain(
        scale_by_muon(momentum, nesterov, ns_steps, eps, fan_in_axes),
        add_decayed_weights(weight_decay) if weight_decay else None,
        scale_by_learning_rate(learning_rate),
    )
    on_rest = adamw(adam_learning_rate, b1, b2, adam_eps, weight_decay=weight_decay, mask=matrices)
    return chain(masked(on_matrices, muon_mask), masked(on_rest, rest))
