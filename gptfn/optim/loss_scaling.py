"""Dynamic loss scaling for float16 training, as a wrapper around any optimizer."""

from __future__ import annotations

import optree
import torch

from gptfn.optim.base import GradientTransformation, donated
from gptfn.tree import Tree, global_norm


def loss_scaling(
    tx: GradientTransformation, init_scale: float = 2.0**15, growth_interval: int = 2000
) -> GradientTransformation:
    """Dynamic loss scaling for float16: wraps ``tx``; its state carries ``loss_scale``.

    ``gptfn.train.make_train_step`` multiplies the loss by the scale and divides the gradients
    by it. A step whose gradients are not finite is skipped (zero update, inner state kept) and
    halves the scale; ``growth_interval`` finite steps in a row double it.

    Args:
      tx: the optimizer to protect.
      init_scale: the first loss scale.
      growth_interval: finite steps in a row before the scale doubles.

    Returns:
      A ``GradientTransformation`` whose state is ``{"inner", "loss_scale", "good_steps"}``.
    """

    def init(params: Tree) -> Tree:
        return {
            "inner": tx.init(params),
            "loss_scale": torch.tensor(init_scale),
            "good_steps": torch.zeros((), dtype=torch.int64),
        }

    def update(grads: Tree, state: Tree, params: Tree | None = None) -> tuple[Tree, Tree]:
        finite = torch.isfinite(global_norm(grads))
        safe = optree.tree_map(lambda g: torch.where(finite, g, torch.zeros_like(g)), grads)
        with donated(False):  # the old inner state is kept on a non-finite step
            updates, inner = tx.update(safe, state["inner"], params)
        keep = lambda new, old: torch.where(finite, new, old)  # noqa: E731
        updates = optree.tree_map(lambda u: keep(u, torch.zeros_like(u)), updates)
        inner = optree.tree_map(keep, inner, state["inner"])
        good = torch.where(finite, state["good_steps"] + 1, torch.zeros_like(state["good_steps"]))
        grow = good >= growth_interval
        scale = torch.where(finite, state["loss_scale"], state["loss_scale"] / 2)
        scale = torch.where(grow, scale * 2, scale)
        good = torch.where(grow, torch.zeros_like(good), good)
        return updates, {"inner": inner, "loss_scale": scale, "good_steps": good}

    return GradientTransformation(init, update)
