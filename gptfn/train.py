"""Training, in a few files, each with one job:

- :mod:`gptfn.train_step`: the pure step ``make_train_step(tx)``, ``(params, opt_state, batch)
  -> (params, opt_state, metrics)``, with gradients from ``torch.func.vjp``; it composes with
  ``vmap``/``grad`` and ``torch.compile``.
- :mod:`gptfn.train_config`: :class:`TrainConfig`, every setting of a run in sections (model,
  optimizer, data, run), each with its help line and allowed values.
- :mod:`gptfn.loop`: :func:`train`, the loop with the side effects (data, evaluation,
  checkpoints), one function per part; beside it :mod:`gptfn.train_log` (log file, progress,
  printed lines), :mod:`gptfn.interrupt` (Ctrl-C / SIGTERM) and :mod:`gptfn.run_dir` (never
  replace a run unless asked; clean up after a crash).
- :mod:`gptfn.optim.config`: the optimizer a run asks for (``make_optimizer``, ``lr_schedule``).

This module gathers the names a user imports: ``from gptfn.train import TrainConfig, train``.
"""

from __future__ import annotations

from gptfn.loop import TrainingInterrupted, train
from gptfn.optim import OptimizerConfig, loss_scaling, lr_schedule, make_optimizer
from gptfn.run_dir import RunExistsError
from gptfn.train_config import DataOptions, ModelOptions, RunOptions, TrainConfig
from gptfn.train_step import make_train_step

__all__ = [
    "DataOptions",
    "ModelOptions",
    "OptimizerConfig",
    "RunExistsError",
    "RunOptions",
    "TrainConfig",
    "TrainingInterrupted",
    "loss_scaling",
    "lr_schedule",
    "make_optimizer",
    "make_train_step",
    "train",
]
