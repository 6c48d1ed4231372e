"""Transforms of the loss that torch.func makes cheap: per-example gradients.

(Ensembles need no helper — ``vmap(make_train_step(tx))`` over a stacked tree — and
meta-gradients neither — ``torch.func.grad`` of a function that unrolls the step; see
docs/research.md.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gptfn.model import loss
from gptfn.shapes import Params


def per_example_grads(
    params: Params,
    tokens: Tensor,
    targets: Tensor,
    *,
    loss_fn: Callable[..., Tensor] = loss,
    **loss_kwargs: Any,
) -> tuple[Params, Tensor]:
    """The gradient of each sequence's loss, as ``vmap(grad_and_value(loss))`` over rows.

    Args:
      params: The parameter tree.
      tokens: [batch, seq] inputs.
      targets: [batch, seq] next tokens (-1 is ignored).
      loss_fn: ``loss_fn(params, tokens[None], targets[None], **loss_kwargs) -> scalar``;
        ``gptfn.loss`` by default.
      **loss_kwargs: Passed to ``loss_fn`` (e.g. ``attention=``).

    Returns:
      ``(grads, losses)``: a tree like ``params`` whose leaves have a leading [batch] axis, and
      the [batch] per-sequence losses.

    Attention runs SDPA's math backend here (chosen by ``forward`` under nested transforms):
    the fused CPU kernel's backward has no batching rule, so vmap would fall back to a slow
    per-example loop with a warning. See experiments/per_example.py for the measurements.
    """

    def one(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(p, x[None], y[None], **loss_kwargs)

    grad_and_value = torch.func.grad_and_value(one)
    return torch.func.vmap(grad_and_value, in_dims=(None, 0, 0))(params, tokens, targets)
