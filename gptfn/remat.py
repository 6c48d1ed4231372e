"""Activation checkpointing ("remat") that works under ``torch.func.grad``.

``torch.utils.checkpoint`` relies on saved-tensor hooks, which torch.func's grad does not support
("don't yet support saved tensor hooks"). Here a custom ``autograd.Function`` saves only the
inputs of ``fn``; its backward recomputes ``fn`` with ``torch.func.vjp`` and pulls the cotangent
through. Randomness (dropout drawing from the global RNG) and autocast are replayed exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import Tensor

__all__ = ["remat"]


def remat(fn: Callable[[Any, Tensor], Tensor]) -> Callable[[Any, Tensor], Tensor]:
    """Wrap ``fn(params_subtree, x) -> y`` so that its activations are recomputed in backward
    instead of stored. Same values and gradients as ``fn``; less memory, ~one more forward."""

    def wrapped(params: Any, x: Tensor) -> Tensor:
        leaves, spec = optree.tree_flatten(params)
        return _Remat.apply(fn, spec, torch.default_generator.clone_state(), x, *leaves)

    return wrapped


class _Remat(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        fn: Callable, spec: Any, rng_before: torch.Generator, x: Tensor, *leaves: Tensor
    ) -> Tensor:
        with torch.no_grad():
            return fn(optree.tree_unflatten(spec, list(leaves)), x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        fn, spec, rng_before, x, *leaves = inputs
        ctx.fn, ctx.spec, ctx.rng_before = fn, spec, rng_before
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, *leaves)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, *leaves = ctx.saved_tensors

        def replay(x: Tensor, *leaves: Tensor) -> Tensor:
            return ctx.fn(optree.tree_unflatten(ctx.spec, list(leaves)), x)

        with torch.random.fork_rng(devices=[]), torch.autocast(**ctx.autocast):
            torch.set_rng_state(ctx.rng_before.get_state())
            _, vjp = torch.func.vjp(replay, x, *leaves)
            grads = vjp(grad_out)
        return (None, None, None, *grads)


def _autocast_state(device_type: str) -> dict[str, Any]:
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
    }
