"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning"), as a user optimizer.

Adam's direction plus decoupled weight decay, then each matrix's step is rescaled so that its
norm is ``||p||`` (the layer-wise trust ratio ``||p|| / ||adam + wd * p||``), then
``-learning_rate``. Biases and norm scales get plain AdamW steps (no decay, no trust ratio), as
BERT's LAMB leaves them out. Built from ``gptfn.optim`` blocks plus one transform of its own.

    gptfn train --optimizer experiments.my_optimizers.lamb:lamb --lr 0.01   # from the repo root
    python experiments/optimizer_track.py --optimizer my_optimizers.lamb:lamb
"""

from __future__ import annotations

import optree
import torch

import gptfn.optim as optim


def scale_by_trust_ratio(min_norm: float = 0.0) -> optim.GradientTransformation:
    """Scale each leaf's update by ``||param|| / ||update||`` (1 where either norm is 0).

    Args:
      min_norm: norms at or below this count as 0.

    Returns:
      A stateless ``GradientTransformation``; it needs ``params`` in ``update``.
    """

    def init(params):
        return ()

    def ratio(update: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        p_norm, u_norm = param.norm(), update.norm()
        trusted = (p_norm > min_norm) & (u_norm > min_norm)
        return update * torch.where(trusted, p_norm / u_norm.clamp_min(1e-12), 1.0)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_trust_ratio needs the params")
        return optree.tree_map(ratio, updates, params), state

    return optim.GradientTransformation(init, update)


def lamb(
    learning_rate: optim.Schedule | float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 0.01,
    eps: float = 1e-6,
) -> optim.GradientTransformation:
    """LAMB on matrices, AdamW (without decay) on the other leaves.

    Args:
      learning_rate: a number, or a schedule of the step count (``gptfn train`` passes its
        warm-up + cosine schedule).
      beta1: first-moment decay (``gptfn train`` passes ``--beta1``).
      beta2: second-moment decay (``--beta2``).
      weight_decay: decoupled weight decay on matrices, inside the trust ratio
        (``--weight-decay``).
      eps: added to Adam's denominator.

    Returns:
      A ``GradientTransformation``.
    """
    on_matrices = optim.chain(
        optim.scale_by_adam(beta1, beta2, eps),
        optim.add_decayed_weights(weight_decay),
        scale_by_trust_ratio(),
        optim.scale_by_learning_rate(learning_rate),
    )
    on_rest = optim.adamw(learning_rate, beta1, beta2, eps, weight_decay=0.0, mask=None)
    return optim.chain(
        optim.masked(on_matrices, optim.matrices),
        optim.masked(on_rest, lambda path, leaf: not optim.matrices(path, leaf)),
    )
