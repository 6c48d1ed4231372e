"""``inject_hyperparams``: hyper-parameters as tensors in the optimizer state (as optax does).

Once in the state, a learning rate or weight decay can be changed between steps
(``set_hyperparams``), given a member axis and batched under ``vmap`` (an ensemble where each
member has its own learning rate), or differentiated (meta-gradients through the update).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from gptfn.optim.base import GradientTransformation
from gptfn.tree import Tree


class InjectHyperparamsState(NamedTuple):
    """``count`` of updates, the current ``hyperparams`` (0-d tensors, or [members] under an
    ensemble) and the wrapped optimizer's ``inner_state``."""

    count: Tensor
    hyperparams: dict[str, Tensor]
    inner_state: Tree


def _is_numeric(value: Any) -> bool:
    return isinstance(value, (int, float, Tensor)) and not isinstance(value, bool)


def _float_dtype(tree: Tree) -> torch.dtype:
    """The dtype of the tree's first floating leaf (float32 when it has none)."""
    floats = [x for x in optree.tree_leaves(tree) if x.is_floating_point()]
    return floats[0].dtype if floats else torch.float32


def inject_hyperparams(
    factory: Callable[..., GradientTransformation],
) -> Callable[..., GradientTransformation]:
    """Wrap an optimizer factory so that its numeric keyword arguments live in the state.

    Numbers become 0-d tensors in the params' dtype (float64 params: a float64 learning rate).
    Schedules (callables of the step count) are evaluated each update and their current value
    recorded, cast to that dtype too. Other arguments (masks, flags) pass through unchanged.

    Args:
      factory: An optimizer factory taking keyword arguments, e.g. ``gptfn.optim.adamw``.

    Returns:
      A function of the factory's keyword arguments returning a ``GradientTransformation``
      whose state is an :class:`InjectHyperparamsState`.

    Examples:
      >>> import torch
      >>> from gptfn.optim import adamw, inject_hyperparams
      >>> tx = inject_hyperparams(adamw)(learning_rate=1e-3, weight_decay=0.1)
      >>> state = tx.init({"w": torch.zeros(2, 2, dtype=torch.float64)})
      >>> state.hyperparams["learning_rate"]
      tensor(0.0010, dtype=torch.float64)
    """

    def make(**hyperparams: Any) -> GradientTransformation:
        numeric = {k: v for k, v in hyperparams.items() if _is_numeric(v)}
        schedules = {k: v for k, v in hyperparams.items() if callable(v)}
        static = {k: v for k, v in hyperparams.items() if k not in numeric and k not in schedules}

        def current(values: dict[str, Tensor], count: Tensor, dtype: torch.dtype):
            return {**values, **{k: fn(count).to(dtype) for k, fn in schedules.items()}}

        def init(params: Tree) -> InjectHyperparamsState:
            count = torch.zeros((), dtype=torch.int64)
            dtype = _float_dtype(params)
            values = {k: torch.as_tensor(v, dtype=dtype) for k, v in numeric.items()}
            values = current(values, count, dtype)
            return InjectHyperparamsState(count, values, factory(**static, **values).init(params))

        def update(updates: Tree, state: InjectHyperparamsState, params: Tree | None = None):
            dtype = _float_dtype(updates if params is None else params)
            values = current(state.hyperparams, state.count, dtype)
            updates, inner = factory(**static, **values).update(updates, state.inner_state, params)
            return updates, InjectHyperparamsState(state.count + 1, values, inner)

        return GradientTransformation(init, update)

    return make


def set_hyperparams(
    state: InjectHyperparamsState, **values: float | Tensor
) -> InjectHyperparamsState:
    """A new state with some hyper-parameters replaced: numbers or 0-d tensors, or tensors with
    a leading member axis for a state stacked over an ensemble."""
    if not isinstance(state, InjectHyperparamsState):
        raise TypeError(
            "set_hyperparams needs the state of an inject_hyperparams(...) optimizer, "
            f"got {type(state).__name__}"
        )
    unknown = sorted(set(values) - set(state.hyperparams))
    if unknown:
        raise KeyError(
            f"unknown hyper-parameters {unknown}; this state has {sorted(state.hyperparams)}"
        )
    new = dict(state.hyperparams)
    for name, value in values.items():
        old = state.hyperparams[name]
        if isinstance(value, Tensor) and value.is_floating_point():
            new[name] = value.to(old.device)  # keep its dtype and its autograd history
        else:
            new[name] = torch.as_tensor(value, dtype=old.dtype, device=old.device)
    return state._replace(hyperparams=new)
