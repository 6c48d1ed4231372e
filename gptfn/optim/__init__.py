"""Functional optimizers over parameter trees, optax-style: ``init``/``update`` and ``chain``.

Only optimizers live here (the contract, building blocks, combinators, schedules, aliases, loss
scaling); they see trees, never the model. The settings of a training run that pick an optimizer
(``OptimizerConfig``, ``make_optimizer``) are in ``gptfn.train``.
"""

from gptfn.optim.aliases import adamw, hidden_matrices, lion, matrices, muon, sgd
from gptfn.optim.base import (
    GradientTransformation,
    Schedule,
    apply_updates,
    donated,
    leaf_ops,
    set_foreach,
    update_and_apply,
)
from gptfn.optim.combine import chain, masked
from gptfn.optim.hyperparams import InjectHyperparamsState, inject_hyperparams, set_hyperparams
from gptfn.optim.loss_scaling import loss_scaling
from gptfn.optim.privacy import differentially_private_aggregate, per_example_global_norms
from gptfn.optim.schedules import (
    constant_schedule,
    linear_schedule,
    warmup_cosine_decay_schedule,
    warmup_stable_decay_schedule,
)
from gptfn.optim.transforms import (
    add_decayed_weights,
    clip_by_global_norm,
    identity,
    leading_fan_in_axes,
    newton_schulz,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_lion,
    scale_by_muon,
    scale_by_schedule,
    set_to_zero,
    trace,
)

__all__ = [
    "loss_scaling",
    "InjectHyperparamsState",
    "differentially_private_aggregate",
    "inject_hyperparams",
    "per_example_global_norms",
    "set_hyperparams",
    "set_to_zero",
    "GradientTransformation",
    "Schedule",
    "add_decayed_weights",
    "adamw",
    "apply_updates",
    "donated",
    "chain",
    "clip_by_global_norm",
    "constant_schedule",
    "hidden_matrices",
    "leaf_ops",
    "leading_fan_in_axes",
    "linear_schedule",
    "identity",
    "lion",
    "masked",
    "matrices",
    "muon",
    "newton_schulz",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_muon",
    "scale_by_schedule",
    "set_foreach",
    "sgd",
    "trace",
    "update_and_apply",
    "warmup_cosine_decay_schedule",
    "warmup_stable_decay_schedule",
]
