"""Training, in a few files, each with one job:

- :mod:`gptfn.train.step`: the pure step ``make_train_step(tx)``, ``(params, opt_state, batch)
  -> (params, opt_state, metrics)``, with gradients from ``torch.func.vjp``; it composes with
  ``vmap``/``grad`` and ``torch.compile``.
- :mod:`gptfn.train.options`: :class:`TrainConfig`, every setting of a run in sections (model,
  optimizer, data, run), each with its help line and allowed values; the model section is
  derived from ``GPTConfig``'s fields.
- :mod:`gptfn.train.optimizer_options`: the optimizer a run asks for (``OptimizerConfig``,
  ``make_optimizer``, ``lr_schedule``) and :mod:`gptfn.train.user_optimizer` (``--optimizer
  module:function``).
- :mod:`gptfn.train.loop`: :func:`train`, the loop with the side effects (data, evaluation,
  checkpoints), one function per part; beside it :mod:`gptfn.train.log` (log file, progress,
  printed lines), :mod:`gptfn.train.interrupt` (Ctrl-C / SIGTERM), :mod:`gptfn.train.run_dir`
  (never replace a run unless asked; clean up after a crash), :mod:`gptfn.train.finetune`
  (starting from a pretrained model) and :mod:`gptfn.train.plot` (curves from a run's log).

This module gathers the names a user imports: ``from gptfn.train import TrainConfig, train``.
"""

from __future__ import annotations

from gptfn.optim import loss_scaling
from gptfn.train.host_memory import keep_freed_memory, release_freed_memory
from gptfn.train.interrupt import TrainingInterrupted
from gptfn.train.loop import train
from gptfn.train.optimizer_options import (
    OPTIMIZERS,
    OptimizerConfig,
    OptionError,
    learning_rates,
    lr_schedule,
    make_optimizer,
    muon_momentum,
    state_clash,
)
from gptfn.train.options import DataOptions, ModelOptions, RunOptions, TrainConfig
from gptfn.train.plot import plot_run, read_log
from gptfn.train.run_dir import RunExistsError
from gptfn.train.step import make_train_step

__all__ = [
    "OPTIMIZERS",
    "DataOptions",
    "ModelOptions",
    "OptimizerConfig",
    "OptionError",
    "RunExistsError",
    "RunOptions",
    "TrainConfig",
    "TrainingInterrupted",
    "keep_freed_memory",
    "learning_rates",
    "loss_scaling",
    "lr_schedule",
    "make_optimizer",
    "make_train_step",
    "muon_momentum",
    "plot_run",
    "read_log",
    "release_freed_memory",
    "state_clash",
    "train",
]
