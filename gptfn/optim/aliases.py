"""Ready-made optimizers built from the transforms, with optax's argument names."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gptfn.optim.base import GradientTransformation, Scalar, Schedule
from gptfn.optim.combine import MaskSpec, chain, masked
from gptfn.optim.transforms import (
    add_decayed_weights,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_muon,
    trace,
)

__all__ = ["sgd", "adamw", "lion", "muon", "matrices", "hidden_matrices"]

LR = Scalar | Schedule


def matrices(path: str, leaf: Tensor) -> bool:
    """Default weight-decay mask (nanoGPT's groups): decay >=2-D leaves, not biases or norms."""
    return leaf.ndim >= 2


def hidden_matrices(path: str, leaf: Tensor) -> bool:
    """Muon's default: >=2-D leaves inside the network, not the (un)embedding tables."""
    return leaf.ndim >= 2 and path.split(".")[0] not in ("wte", "wpe", "unembed")


def _chain(*parts: GradientTransformation | None) -> GradientTransformation:
    return chain(*(p for p in parts if p is not None))


def sgd(
    learning_rate: LR, momentum: float | None = None, nesterov: bool = False
) -> GradientTransformation:
    """Stochastic gradient descent, optionally with (Nesterov) momentum."""
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
    """Adam with decoupled weight decay (Loshchilov & Hutter), decaying ``mask``'d leaves only
    (every leaf when ``mask`` is None); matches ``torch.optim.AdamW``."""
    decay = add_decayed_weights(weight_decay)
    return _chain(
        scale_by_adam(b1, b2, eps),
        decay if mask is None else masked(decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def lion(
    learning_rate: LR,
    b1: Scalar = 0.9,
    b2: Scalar = 0.99,
    weight_decay: Scalar = 1e-3,
    mask: MaskSpec | None = matrices,
) -> GradientTransformation:
    """Lion: sign updates with decoupled weight decay (use a ~3-10x smaller lr than AdamW)."""
    decay = add_decayed_weights(weight_decay)
    return _chain(
        scale_by_lion(b1, b2),
        decay if mask is None else masked(decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def muon(
    learning_rate: LR = 0.02,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    adam_learning_rate: LR = 3e-3,
    b1: float = 0.9,
    b2: float = 0.95,
    weight_decay: float = 0.0,
    muon_mask: MaskSpec = hidden_matrices,
) -> GradientTransformation:
    """Muon on hidden matrices (``muon_mask``), AdamW on everything else."""

    def rest(path: str, leaf: Any) -> bool:
        return not muon_mask(path, leaf) if callable(muon_mask) else False

    if not callable(muon_mask):
        raise TypeError("muon_mask must be a predicate (path, leaf) -> bool")
    on_matrices = _chain(
        scale_by_muon(momentum, nesterov, ns_steps),
        add_decayed_weights(weight_decay) if weight_decay else None,
        scale_by_learning_rate(learning_rate),
    )
    on_rest = adamw(adam_learning_rate, b1, b2, weight_decay=weight_decay, mask=matrices)
    return chain(masked(on_matrices, muon_mask), masked(on_rest, rest))
