"""Activation checkpointing ("remat") that works under ``torch.func.grad``.

``torch.utils.checkpoint`` relies on saved-tensor hooks, which torch.func's grad does not support
("don't yet support saved tensor hooks"). Here a custom ``autograd.Function`` saves only the
inputs of ``fn``; its backward recomputes ``fn`` with ``torch.func.vjp`` and pulls the cotangent
through. Randomness and autocast are replayed exactly: the RNG states of the CPU and of every
accelerator that ``x`` and the params live on (each CUDA device, ...) are captured before the
forward and restored for the recomputation, so dropout draws the same mask twice; afterwards the
global RNG streams are as they were before the backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optree
import torch
from torch import Tensor

from gptfn.model.attention import recomputed


def remat(fn: Callable[[Any, Tensor], Tensor]) -> Callable[[Any, Tensor], Tensor]:
    """Wrap ``fn(params_subtree, x) -> y`` so that its activations are recomputed in backward
    instead of stored. Same values and gradients as ``fn`` (dropout from the global RNGs
    included); less memory, ~one more forward.

    Args:
      fn: A function of a parameter subtree and one activation tensor; its randomness must come
        from the global generators (``torch.manual_seed``'s), not an explicit ``generator=``.

    Returns:
      A function with ``fn``'s signature, for ``torch.func.grad``/``vjp`` and ``.backward()``.
    """

    def wrapped(params: Any, x: Tensor) -> Tensor:
        leaves, spec = optree.tree_flatten(params)
        rng = _RngStates.capture([x, *leaves])
        return _Remat.apply(fn, spec, rng, x, *leaves)

    return wrapped


@dataclass(frozen=True)
class _RngStates:
    """The CPU generator's state and those of the accelerator devices some tensors live on."""

    cpu: Tensor
    devices: dict[str, dict[int, Tensor]]  # device type -> device index -> state

    @staticmethod
    def capture(tensors: list[Tensor]) -> _RngStates:
        used: dict[str, set[int]] = {}
        for t in tensors:
            if t.device.type not in ("cpu", "meta"):
                used.setdefault(t.device.type, set()).add(t.device.index or 0)
        devices = {
            kind: {i: torch.get_device_module(kind).get_rng_state(i) for i in sorted(indices)}
            for kind, indices in used.items()
        }
        return _RngStates(torch.get_rng_state(), devices)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the body from these states; restore the states found on entry afterwards."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=[]))
            for kind, states in self.devices.items():
                stack.enter_context(torch.random.fork_rng(devices=list(states), device_type=kind))
            torch.set_rng_state(self.cpu)
            for kind, states in self.devices.items():
                for index, state in states.items():
                    torch.get_device_module(kind).set_rng_state(state, index)
            yield


class _Remat(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        fn: Callable, spec: Any, rng: _RngStates, x: Tensor, *leaves: Tensor
    ) -> Tensor:
        with torch.no_grad(), recomputed():  # attention as the recomputation will run it
            return fn(optree.tree_unflatten(spec, list(leaves)), x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        fn, spec, rng, x, *leaves = inputs
        ctx.fn, ctx.spec, ctx.rng = fn, spec, rng
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, *leaves)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, *leaves = ctx.saved_tensors

        def replay(x: Tensor, *leaves: Tensor) -> Tensor:
            return ctx.fn(optree.tree_unflatten(ctx.spec, list(leaves)), x)

        with ctx.rng.replayed(), torch.autocast(**ctx.autocast):
            _, vjp = torch.func.vjp(replay, x, *leaves)
            grads = vjp(grad_out)
        return (None, None, None, *grads)


def _autocast_state(device_type: str) -> dict[str, Any]:
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
    }
