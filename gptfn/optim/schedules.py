"""Learning-rate schedules: functions of the 0-d step-count tensor, so they trace and batch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gptfn.optim.base import Schedule

__all__ = ["constant_schedule", "warmup_cosine_decay_schedule"]


def constant_schedule(value: float) -> Schedule:
    """Always ``value``."""
    return lambda count: torch.full((), value, dtype=torch.float32)


def warmup_cosine_decay_schedule(
    init_value: float, peak_value: float, warmup_steps: int, decay_steps: int, end_value: float
) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine
    decay to ``end_value`` at ``decay_steps`` (counted from 0, warm-up included), flat after."""
    if decay_steps < warmup_steps:
        raise ValueError(f"decay_steps ({decay_steps}) must be >= warmup_steps ({warmup_steps})")

    def schedule(count: Tensor) -> Tensor:
        step = count.to(torch.float32)
        warm = init_value + (peak_value - init_value) * step / max(warmup_steps, 1)
        progress = ((step - warmup_steps) / max(decay_steps - warmup_steps, 1)).clamp(0.0, 1.0)
        cosine = end_value + 0.5 * (peak_value - end_value) * (1 + torch.cos(math.pi * progress))
        return torch.where(step < warmup_steps, warm, cosine)

    return schedule
