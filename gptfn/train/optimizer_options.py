"""The optimizer a training run asks for: settings, the learning-rate schedule, the factory.

:class:`OptimizerConfig` is a dataclass whose fields carry one line of help and their allowed
values (``gptfn.settings.option``); ``gptfn train`` builds its flags and checks its TOML file
from them. :func:`make_optimizer` turns the settings into a ``GradientTransformation`` (a
built-in one, or a user's function named ``module.path:function``,
:mod:`gptfn.train.user_optimizer`); it knows nothing about models or the CLI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optree
from torch import Tensor

from gptfn.optim.aliases import adamw, lion, muon, sgd
from gptfn.optim.base import GradientTransformation, Schedule, leaf_ops
from gptfn.optim.combine import chain, masked
from gptfn.optim.schedules import (
    linear_schedule,
    warmup_cosine_decay_schedule,
    warmup_stable_decay_schedule,
)
from gptfn.optim.transforms import clip_by_global_norm, clip_factor, set_to_zero
from gptfn.settings import OptionError, check_options, option
from gptfn.train.user_optimizer import is_user_optimizer, load_user_optimizer, user_optimizer

OPTIMIZERS = ("adamw", "sgd", "lion", "muon")
SCHEDULES = ("cosine", "wsd")
USER_OPTIMIZER = "module.path:function (a user optimizer)"
MUON_MOMENTUM_START = 0.85  # the speedrun's warm-up starts here


# ----------------------------------------------------------------------------- the optimizer


def _optimizer_problem(name: str) -> str | None:
    """Why ``name`` is neither a built-in optimizer nor an importable user optimizer, or None."""
    if name in OPTIMIZERS:
        return None
    if not is_user_optimizer(name):
        return f"one of {', '.join(OPTIMIZERS)}, or {USER_OPTIMIZER}"
    try:
        load_user_optimizer(name)
    except ValueError as err:
        return str(err)
    return None


@dataclasses.dataclass
class OptimizerConfig:
    """What optimizer a run uses and how its learning rate moves (warm-up, then cosine decay,
    or warm-up, stable, linear decay)."""

    optimizer: str = option(
        "adamw",
        "adamw, sgd (Nesterov momentum), lion, muon (AdamW on vectors and embeddings), or "
        "module.path:function, your own: called with the lr schedule, returns a "
        "GradientTransformation",
        check=_optimizer_problem,
    )
    lr: float = option(2e-3, "peak learning rate (muon: of its AdamW part)", above=0)
    min_lr: float = option(2e-4, "learning rate at the end of the decay", low=0)
    warmup_steps: int = option(100, "steps of linear warm-up from 0 to the peak", low=0)
    schedule: str = option(
        "cosine", "after warm-up: cosine decay, or wsd (hold the peak, then decay linearly)",
        choices=SCHEDULES,
    )  # fmt: skip
    decay_fraction: float = option(
        0.4, "wsd: the last share of the steps that decays linearly", above=0, below=1
    )
    weight_decay: float = option(
        0.1, "decoupled weight decay on matrices (adamw, lion; sgd and muon: none)", low=0
    )
    beta1: float = option(0.9, "first-moment decay (adamw, lion, muon's AdamW)", low=0, below=1)
    beta2: float = option(0.99, "second-moment decay (adamw, lion, muon's AdamW)", low=0, below=1)
    momentum: float = option(0.9, "sgd's Nesterov momentum", low=0, below=1)
    muon_lr: float = option(0.02, "muon's peak learning rate on hidden matrices", above=0)
    muon_momentum: float = option(0.95, "muon's momentum on hidden matrices", low=0, below=1)
    muon_momentum_warmup: int = option(
        0, f"muon: steps over which its momentum rises from {MUON_MOMENTUM_START} (0: none)", low=0
    )
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)", low=0)

    def __post_init__(self) -> None:
        check_options(self)
        if self.min_lr > self.lr:
            raise OptionError("min_lr", self.min_lr, f"must be <= lr ({self.lr})")


def lr_schedule(cfg: OptimizerConfig, total_steps: int, peak: float | None = None) -> Schedule:
    """Linear warm-up to ``peak`` (default ``cfg.lr``), then cosine decay (or, with
    ``schedule="wsd"``, the peak held, then a linear decay over the last ``decay_fraction`` of
    the steps) to the same ratio of ``min_lr / lr`` at ``total_steps``."""
    peak = cfg.lr if peak is None else peak
    floor = cfg.min_lr * peak / cfg.lr
    if cfg.schedule == "wsd":
        end = max(total_steps, cfg.warmup_steps)
        start = max(cfg.warmup_steps, round(end * (1 - cfg.decay_fraction)))
        return warmup_stable_decay_schedule(0.0, peak, cfg.warmup_steps, start, end, floor)
    return warmup_cosine_decay_schedule(
        0.0, peak, cfg.warmup_steps, max(total_steps, cfg.warmup_steps), floor
    )


def learning_rates(cfg: OptimizerConfig, total_steps: int) -> dict[str, Schedule]:
    """Each optimizer part's learning-rate schedule, by the name the log gives it: ``lr`` (the
    optimizer's, or with Muon its AdamW part's) and, with Muon, ``muon_lr`` (its hidden
    matrices')."""
    rates = {"lr": lr_schedule(cfg, total_steps)}
    if cfg.optimizer == "muon":
        rates["muon_lr"] = lr_schedule(cfg, total_steps, peak=cfg.muon_lr)
    return rates


def muon_momentum(cfg: OptimizerConfig) -> float | Schedule:
    """Muon's momentum: ``cfg.muon_momentum``, or with ``muon_momentum_warmup`` steps a linear
    rise to it from 0.85 (or from itself, if lower), as the modded-nanogpt speedrun does."""
    if cfg.muon_momentum_warmup == 0:
        return cfg.muon_momentum
    start = min(MUON_MOMENTUM_START, cfg.muon_momentum)
    return linear_schedule(start, cfg.muon_momentum, cfg.muon_momentum_warmup)


def state_clash(saved: dict[str, Any], cfg: OptimizerConfig) -> tuple[str, Any, Any] | None:
    """``(option, saved value, cfg's value)`` of a setting that gives the optimizer state
    another structure than ``saved`` (a checkpoint's record of the settings) had, or None.

    Those are ``optimizer`` (a user optimizer is known by its name) and, for Muon,
    ``muon_momentum_warmup`` on or off (its state counts steps only with a warm-up). A setting
    the record lacks (older files) counts as its default.
    """
    there = saved.get("optimizer", cfg.optimizer)
    if there != cfg.optimizer:
        return "optimizer", there, cfg.optimizer
    warm = saved.get("muon_momentum_warmup", 0)
    if there == "muon" and (warm > 0) != (cfg.muon_momentum_warmup > 0):
        return "muon_momentum_warmup", warm, cfg.muon_momentum_warmup
    return None


def make_optimizer(
    cfg: OptimizerConfig,
    total_steps: int,
    owned: Callable[[str, Tensor], bool] | None = None,
) -> GradientTransformation:
    """The optimizer ``cfg`` names, on its schedule (:func:`lr_schedule`: cosine or wsd),
    after gradient clipping.

    A user optimizer (``cfg.optimizer`` is ``module.path:function``) is called with the
    schedule and the settings its signature names (see :mod:`gptfn.train.user_optimizer`).

    Args:
      cfg: the settings.
      total_steps: where the decay ends (the run's ``max_steps``).
      owned: ``(path, leaf) -> bool``, the leaves this process updates (default all; ZeRO-1
        gives each rank its share); the others get zero updates.

    Returns:
      A ``GradientTransformation`` over a flat ``{path: leaf}`` dict or any tree. Its state is
      keyed by parameter path, so a checkpoint's state is the same whatever the world size or
      sharding.
    """
    schedule = lr_schedule(cfg, total_steps)
    if cfg.optimizer == "adamw":
        tx = adamw(schedule, cfg.beta1, cfg.beta2, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        tx = sgd(schedule, momentum=cfg.momentum, nesterov=True)
    elif cfg.optimizer == "lion":
        tx = lion(schedule, cfg.beta1, cfg.beta2, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "muon":
        tx = muon(
            lr_schedule(cfg, total_steps, peak=cfg.muon_lr),
            momentum=muon_momentum(cfg),
            adam_learning_rate=schedule,
            b1=cfg.beta1,
            b2=cfg.beta2,
        )
    elif is_user_optimizer(cfg.optimizer):
        options = dataclasses.asdict(cfg) | {"total_steps": total_steps}
        for name in ("optimizer", "schedule", "decay_fraction"):  # in `schedule`
            del options[name]
        try:
            tx = user_optimizer(cfg.optimizer, schedule, options)
        except ValueError as err:
            raise OptionError("optimizer", cfg.optimizer, str(err)) from None
    else:
        raise OptionError("optimizer", cfg.optimizer, f"one of {', '.join(OPTIMIZERS)}")
    mine = owned if owned is not None else (lambda path, leaf: True)
    ours = masked(tx, mine)
    tx = chain(ours, masked(set_to_zero(), lambda path, leaf: not mine(path, leaf)))
    clip = clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else None
    whole = tx if clip is None else chain(clip, tx)
    if owned is None and ours.fused_step is not None:  # every leaf is this process's
        whole = whole._replace(fused_step=_one_pass(cfg.grad_clip, clip, ours))
    return whole


def _one_pass(
    max_norm: float, clip: GradientTransformation | None, ours: GradientTransformation
) -> Callable[..., tuple[Any, Any] | None]:
    """``make_optimizer``'s fused step when no leaf is zeroed: the optimizer's own (AdamW's
    kernel), the clip its gradients' divisor; None where that does not apply. The state is
    the chain's: ``(clip's, (ours, the zeroed part's))``, without the clip's when unclipped."""

    def fused_step(
        updates: Any, state: Any, params: Any, grad_scale: Tensor | None = None
    ) -> tuple[Any, Any] | None:
        if grad_scale is not None or not leaf_ops(max_norm).fused:
            return None
        clip_state, (our_state, zero_state) = state if clip is not None else ({}, state)
        divisor = None
        if clip is not None:  # the gradients' norm: the step's logged one, not a second pass
            factor = clip_factor(leaf_ops().norm(optree.tree_leaves(updates)), max_norm)
            divisor = None if factor >= 1 else (1 / factor).float()
        stepped = ours.fused_step(updates, our_state, params, divisor)  # type: ignore[misc]
        if stepped is None:
            return None
        params, our_state = stepped
        rest = (our_state, zero_state)
        return params, rest if clip is None else (clip_state, rest)

    return fused_step
