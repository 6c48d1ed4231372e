"""Learning-rate schedules: functions of the 0-d step-count tensor, so they trace and batch.

A schedule computes in float64 (:func:`gptfn.optim.base.scalar_dtype`) on the count's device
and returns a float64 0-d tensor; its consumer casts it to the params' dtype
(``scale_by_schedule`` per leaf, ``inject_hyperparams`` in the state). So float64 params get a
float64 learning rate, not one rounded to float32, and float32 params lose nothing either.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gptfn.optim.base import Schedule, scalar_dtype


def constant_schedule(value: float | Tensor) -> Schedule:
    """Always ``value`` (a number, or a tensor: then gradients flow to it)."""

    def schedule(count: Tensor) -> Tensor:
        return torch.as_tensor(value, dtype=scalar_dtype(count.device), device=count.device)

    return schedule


def linear_schedule(init_value: float, end_value: float, transition_steps: int) -> Schedule:
    """From ``init_value`` at count 0 linearly to ``end_value`` at ``transition_steps``, then
    flat (optax's ``linear_schedule`` without its ``transition_begin``).

    Args:
      init_value: The value at count 0.
      end_value: The value from ``transition_steps`` on.
      transition_steps: Steps of the linear ramp (0: ``end_value`` from the start).

    Returns:
      A schedule ``count -> value`` (float64 0-d tensor).

    Examples:
      >>> import torch
      >>> from gptfn.optim import linear_schedule
      >>> momentum = linear_schedule(0.85, 0.95, 300)
      >>> [round(float(momentum(torch.tensor(t))), 6) for t in (0, 150, 300, 1000)]
      [0.85, 0.9, 0.95, 0.95]
    """
    if transition_steps < 0:
        raise ValueError(f"transition_steps must be >= 0, got {transition_steps}")

    def schedule(count: Tensor) -> Tensor:
        step = count.to(scalar_dtype(count.device))
        if transition_steps == 0:
            return torch.full_like(step, end_value)
        progress = (step / transition_steps).clamp(0.0, 1.0)
        return init_value + (end_value - init_value) * progress

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float, peak_value: float, warmup_steps: int, decay_steps: int, end_value: float
) -> Schedule:
    """Linear warm-up, then cosine decay, then flat (optax's schedule of the same name).

    Args:
      init_value: The value at count 0.
      peak_value: The value at the end of warm-up, count ``warmup_steps``.
      warmup_steps: Steps of linear warm-up from ``init_value`` to ``peak_value``.
      decay_steps: The count at which the cosine reaches ``end_value`` (counted from 0, warm-up
        included, as in optax); must be >= ``warmup_steps``.
      end_value: The value from ``decay_steps`` on.

    Returns:
      A schedule ``count -> value`` (float64 0-d tensor).

    Examples:
      >>> import torch
      >>> from gptfn.optim import warmup_cosine_decay_schedule
      >>> lr = warmup_cosine_decay_schedule(0.0, 1e-3, 10, 110, 1e-4)
      >>> [round(float(lr(torch.tensor(t))), 8) for t in (0, 5, 10, 60, 110, 500)]
      [0.0, 0.0005, 0.001, 0.00055, 0.0001, 0.0001]
    """
    if decay_steps < warmup_steps:
        raise ValueError(f"decay_steps ({decay_steps}) must be >= warmup_steps ({warmup_steps})")

    def schedule(count: Tensor) -> Tensor:
        step = count.to(scalar_dtype(count.device))
        warm = init_value + (peak_value - init_value) * step / max(warmup_steps, 1)
        progress = ((step - warmup_steps) / max(decay_steps - warmup_steps, 1)).clamp(0.0, 1.0)
        cosine = end_value + 0.5 * (peak_value - end_value) * (1 + torch.cos(math.pi * progress))
        return torch.where(step < warmup_steps, warm, cosine)

    return schedule


def warmup_stable_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_start: int,
    decay_steps: int,
    end_value: float,
) -> Schedule:
    """Warm-up, stable, decay (WSD, trapezoidal): linear warm-up, the peak held, then a linear
    decay, then flat.

    Args:
      init_value: The value at count 0.
      peak_value: The value from ``warmup_steps`` to ``decay_start``.
      warmup_steps: Steps of linear warm-up from ``init_value`` to ``peak_value``.
      decay_start: The count at which the linear decay begins (>= ``warmup_steps``).
      decay_steps: The count at which the decay reaches ``end_value`` (>= ``decay_start``).
      end_value: The value from ``decay_steps`` on.

    Returns:
      A schedule ``count -> value`` (float64 0-d tensor).

    Examples:
      >>> import torch
      >>> from gptfn.optim import warmup_stable_decay_schedule
      >>> lr = warmup_stable_decay_schedule(0.0, 1.0, 10, 60, 110, 0.1)
      >>> [round(float(lr(torch.tensor(t))), 6) for t in (0, 5, 10, 60, 85, 110, 500)]
      [0.0, 0.5, 1.0, 1.0, 0.55, 0.1, 0.1]
    """
    if not warmup_steps <= decay_start <= decay_steps:
        raise ValueError(
            f"need warmup_steps ({warmup_steps}) <= decay_start ({decay_start}) <= "
            f"decay_steps ({decay_steps})"
        )

    def schedule(count: Tensor) -> Tensor:
        step = count.to(scalar_dtype(count.device))
        warm = init_value + (peak_value - init_value) * step / max(warmup_steps, 1)
        progress = ((step - decay_start) / max(decay_steps - decay_start, 1)).clamp(0.0, 1.0)
        decay = peak_value + (end_value - peak_value) * progress
        return torch.where(step < warmup_steps, warm, decay)

    return schedule
