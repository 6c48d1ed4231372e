"""Differentially private aggregation of per-example gradients (DP-SGD, Abadi et al., 2016)."""

from __future__ import annotations

import optree
import torch
from torch import Tensor

from gptfn.optim.base import GradientTransformation
from gptfn.tree import Tree


def per_example_global_norms(grads: Tree) -> Tensor:
    """[batch] L2 norms, each over one example's whole gradient tree (leading axis = example)."""
    leaves = optree.tree_leaves(grads)
    squares = [leaf.reshape(leaf.shape[0], -1).pow(2).sum(dim=1) for leaf in leaves]
    return torch.stack(squares).sum(dim=0).sqrt()


def differentially_private_aggregate(
    l2_norm_clip: float, noise_multiplier: float, seed: int = 0
) -> GradientTransformation:
    """Per-example gradients (leaves with a leading example axis) in, one private gradient out:
    clip each example's whole-tree gradient to norm ``l2_norm_clip``, sum, add Gaussian noise of
    std ``noise_multiplier * l2_norm_clip`` to every entry, divide by the batch size.

    Args:
      l2_norm_clip: The largest L2 norm one example's gradient may contribute (> 0).
      noise_multiplier: Noise std relative to ``l2_norm_clip`` (>= 0; 0 for no noise).
      seed: With the step count, seeds the noise generator (CPU, then moved to the leaves'
        device): reproducible and never reused across steps.

    Returns:
      A ``GradientTransformation`` whose state is ``{"count"}``; chain it before an optimizer:
      ``chain(differentially_private_aggregate(1.0, 1.1), adamw(1e-3))``.
    """
    if l2_norm_clip <= 0 or noise_multiplier < 0:
        raise ValueError("need l2_norm_clip > 0 and noise_multiplier >= 0")

    def init(params: Tree) -> Tree:
        return {"count": torch.zeros((), dtype=torch.int64)}

    def update(updates: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        norms = per_example_global_norms(updates)
        batch = norms.shape[0]
        factors = (l2_norm_clip / (norms + 1e-12)).clamp(max=1.0)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(state["count"]))
        std = noise_multiplier * l2_norm_clip

        def aggregate(g: Tensor) -> Tensor:
            clipped = (g * factors.reshape(-1, *([1] * (g.ndim - 1)))).sum(dim=0)
            noise = torch.randn(clipped.shape, generator=gen, dtype=clipped.dtype) * std
            return (clipped + noise.to(clipped.device)) / batch

        return optree.tree_map(aggregate, updates), {"count": state["count"] + 1}

    return GradientTransformation(init, update)
