"""The pure training step: ``(params, opt_state, batch) -> (params, opt_state, metrics)``.

The gradients come from ``torch.func.vjp`` of the loss (see ``grad_fn`` for why not
``grad_and_value``); the step has no side effects, so it composes with ``vmap``/``grad`` and
``torch.compile``. The loop around it is :mod:`gptfn.train.loop`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import Tensor

import gptfn.optim as optim
from gptfn.model import loss
from gptfn.optim.base import known_norm
from gptfn.tracing import inside_transform, is_compiling
from gptfn.tree import Tree

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _grads_and_loss(
    loss_fn: Callable[..., Tensor],
    autocast_dtype: torch.dtype | None,
    loss_kwargs: dict[str, Any],
    params: Tree,
    tokens: Tensor,
    targets: Tensor,
    scale: Tensor | None,
) -> tuple[Tree, Tensor]:
    """Gradients of ``loss * scale`` (the unscaled loss too) on one micro-batch.

    vjp, not grad_and_value: grad always records the backward pass as a graph (create_graph=True,
    so that it can nest), which here costs ~16% more time, keeps extra tensors alive and defeats
    remat. vjp called at the top level does not, and under an outer transform (vmap, grad of the
    step) it composes like grad.
    """

    def objective(p: Tree) -> tuple[Tensor, Tensor]:
        context = (
            torch.autocast(tokens.device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with context:
            value = loss_fn(p, tokens, targets, **loss_kwargs).float()
        return (value * scale if scale is not None else value), value

    if inside_transform() or is_compiling():
        scaled, pullback, value = torch.func.vjp(objective, params, has_aux=True)
        (grads,) = pullback(torch.ones_like(scaled))
        return grads, value
    return _autograd_grads(objective, params)


def _autograd_grads(objective: Callable, params: Tree) -> tuple[Tree, Tensor]:
    """What the vjp above computes, through ``torch.autograd`` on detached leaves: outside any
    transform the two give the same numbers (the same derivative formulas), but every op under
    ``torch.func.vjp`` pays functorch's wrapping; on nanoGPT's CPU recipe (4 x 128, batch 12 x
    64) that was ~9 % of an eager step."""
    leaves, spec = optree.tree_flatten(params)
    inputs = [x.detach().requires_grad_() for x in leaves]
    scaled, value = objective(optree.tree_unflatten(spec, inputs))
    grads = torch.autograd.grad(scaled, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else _like_param(g, x) for x, g in zip(inputs, grads)]
    return optree.tree_unflatten(spec, grads), value.detach()


def _like_param(grad: Tensor, param: Tensor) -> Tensor:
    """``grad``, contiguous where ``param`` is and it is not (a column slice of the fused
    q/k/v weights' gradient): the fused optimizer kernels need one layout per leaf, as
    ``torch.autograd`` gives ``.grad`` its parameter's layout."""
    return grad.contiguous() if param.is_contiguous() and not grad.is_contiguous() else grad


def accumulate(
    grad_fn: Callable[..., tuple[Tree, Tensor]],
    params: Tree,
    opt_state: Tree,
    batch: tuple[Tensor, Tensor],
    accum_steps: int,
    dtype: torch.dtype | None,
) -> tuple[Tree, Tensor, Tensor | None]:
    """The summed gradients of ``accum_steps`` equal micro-batches of ``batch`` (each from
    ``grad_fn(params, tokens, targets, loss_scale)``), their mean loss, and the float16 loss
    scale the optimizer state holds (None without one); the batch and dtype are checked first.
    The one accumulation every train step (plain and sharded) runs."""
    tokens, targets = batch
    scale = opt_state.get("loss_scale") if isinstance(opt_state, dict) else None
    if dtype == torch.float16 and scale is None:
        raise ValueError("float16 training needs tx wrapped in gptfn.optim.loss_scaling(tx)")
    if tokens.shape[0] % accum_steps:
        raise ValueError(
            f"batch of {tokens.shape[0]} rows does not split into {accum_steps} equal micro-batches"
        )
    if accum_steps == 1:
        grads, value = grad_fn(params, tokens, targets, scale)
        return grads, value, scale
    grads, total = None, torch.zeros(())
    for x, y in zip(tokens.chunk(accum_steps), targets.chunk(accum_steps)):
        g, value = grad_fn(params, x, y, scale)
        grads = g if grads is None else optree.tree_map(torch.add, grads, g)
        total = total + value
    return grads, total / accum_steps, scale


def logged_norm(grads: Tree) -> tuple[Tensor, contextlib.AbstractContextManager]:
    """The gradients' global norm (the step logs it) and a context inside which clipping
    takes that value instead of a second pass (eager fused ops only: the memo reads version
    counters, which traced tensors do not have). Both train steps, plain and sharded."""
    leaves, ops = optree.tree_leaves(grads), optim.leaf_ops()
    norm = ops.norm(leaves)
    return norm, known_norm(leaves, norm) if ops.fused else contextlib.nullcontext()


def make_train_step(
    tx: optim.GradientTransformation,
    loss_fn: Callable[..., Tensor] = loss,
    *,
    accum_steps: int = 1,
    dtype: torch.dtype | str | None = None,
    reduce_grads: Callable[[Tree], Tree] | None = None,
    donate: bool = False,
    **loss_kwargs: Any,
) -> Callable[[Tree, Tree, tuple[Tensor, Tensor]], tuple[Tree, Tree, dict[str, Tensor]]]:
    """A pure step ``(params, opt_state, (tokens, targets)) -> (params, opt_state, metrics)``.

    Args:
      tx: the optimizer; for float16 wrap it in :func:`gptfn.optim.loss_scaling`.
      loss_fn: ``loss_fn(params, tokens, targets, **loss_kwargs)``, a 0-d tensor.
      accum_steps: split the batch into this many equal micro-batches and average their
        gradients (the same update as the whole batch at once, in less memory).
      dtype: ``"bfloat16"`` or ``"float16"`` runs the loss under autocast (params stay float32).
      reduce_grads: maps the averaged gradients before the update (data parallelism passes
        ``gptfn.distributed.all_reduce_mean``).
      donate: the step may overwrite the params and optimizer state it is given, as JAX's
        donated arguments (see :func:`gptfn.optim.donated`): AdamW then holds one copy of the
        params and moments instead of two at the update. Use only the returned trees.
      **loss_kwargs: passed to ``loss_fn`` (``dropout=``, ``remat=`` ...).

    Returns:
      The step. Its ``metrics`` hold 0-d tensors: ``loss`` and ``grad_norm`` (before clipping).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    autocast_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None

    grad_fn = functools.partial(_grads_and_loss, loss_fn, autocast_dtype, loss_kwargs)

    def step(params: Tree, opt_state: Tree, batch: tuple[Tensor, Tensor]):
        grads, loss_value, scale = accumulate(
            grad_fn, params, opt_state, batch, accum_steps, autocast_dtype
        )
        if accum_steps > 1 or scale is not None:
            inv = 1.0 / accum_steps if scale is None else 1.0 / (accum_steps * scale)
            grads = optree.tree_map(lambda g: g * inv, grads)
        if reduce_grads is not None:
            grads = reduce_grads(grads)
        grad_norm, remember = logged_norm(grads)
        with remember, optim.donated() if donate else contextlib.nullcontext():
            params, opt_state = optim.update_and_apply(tx, grads, opt_state, params)
        return params, opt_state, {"loss": loss_value, "grad_norm": grad_norm}

    return step
