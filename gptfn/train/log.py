"""What a training run reports: ``log.jsonl``, a progress bar or printed lines, throughput."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import torch

from gptfn.train.optimizer_options import learning_rates
from gptfn.train.options import TrainConfig


class TrainLog:
    """``RUN/log.jsonl``, the progress bar (or, without one, a printed line per record), and
    the throughput since the last record. Only the process with ``main`` writes and prints.

    The bar is drawn only on a terminal: when standard error is a file or a pipe (``> log``,
    ``nohup``) each record is a printed line instead of carriage-return redraws."""

    def __init__(
        self,
        run_dir: Path,
        cfg: TrainConfig,
        start: int,
        world_size: int = 1,
        main: bool = True,
        callbacks: list[Callable[[dict], None]] = (),
    ) -> None:
        from tqdm.auto import tqdm

        self.cfg, self.main, self.callbacks = cfg, main, callbacks
        self.file = (run_dir / "log.jsonl").open("a", encoding="utf-8") if main else None
        self.bar = tqdm(
            total=cfg.run.max_steps,
            initial=start,
            disable=not (cfg.run.progress and main and sys.stderr.isatty()),
            dynamic_ncols=True,
        )
        self.rates = learning_rates(cfg.optimizer, cfg.run.max_steps)
        self.tokens_per_step = (
            cfg.data.batch_size * cfg.data.grad_accum * world_size * cfg.model.block_size
        )
        self.t_start = self.t_last = time.perf_counter()
        self.tokens = 0
        self.last: dict[str, Any] = {}

    def count(self) -> None:
        """One more step done."""
        self.tokens += self.tokens_per_step
        self.bar.update(1)

    def train_record(
        self, done: int, metrics: dict[str, float], opt_state: Any = None
    ) -> dict[str, Any]:
        """The record of step ``done``: loss, the learning rate of each optimizer part as the
        optimizer applied it at this step (its schedule at the update count its state holds:
        a float16 step skipped for overflow does not advance it), gradient norm, tokens/s,
        time."""
        now = time.perf_counter()
        count = torch.tensor(applied_updates(opt_state, done) - 1)
        record = {
            "step": done,
            "train_loss": metrics["train_loss"],
            **{name: float(schedule(count)) for name, schedule in self.rates.items()},
            "grad_norm": metrics["grad_norm"],
            "tokens_per_s": self.tokens / max(now - self.t_last, 1e-9),
            "time": now - self.t_start,
        }
        self.t_last, self.tokens = now, 0
        return record

    def write(self, record: dict[str, Any]) -> None:
        """Append to the log, show it, pass it to the callbacks."""
        self.last = record
        self.bar.set_postfix(
            loss=f"{record['train_loss']:.3f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            **{name: f"{record[name]:.2e}" for name in self.rates},
        )
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.bar.disable:
            print(format_record(record, self.cfg.run.max_steps), flush=True)
        elif "val_loss" in record:
            self.bar.write(format_record(record, self.cfg.run.max_steps))
        for callback in self.callbacks:
            callback(record)

    def seconds(self) -> float:
        """Since the log was opened."""
        return time.perf_counter() - self.t_start

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


def applied_updates(opt_state: Any, default: int) -> int:
    """How many updates the optimizer has applied: the first ``count`` in its state (every
    counting transform advances together, and a skipped float16 step advances none), or
    ``default`` for an optimizer that keeps no count."""
    if opt_state is None:
        return default
    paths, leaves, _ = optree.tree_flatten_with_path(opt_state)
    for path, leaf in zip(paths, leaves):
        if path and path[-1] == "count":
            return int(leaf)
    return default


def format_record(record: dict[str, Any], max_steps: int) -> str:
    """One line: ``step 10/2500: loss 3.1234, lr 2.00e-03[, muon_lr ...], 12,345 tokens/s[,
    val loss ...]``."""
    rates = "".join(f", {name} {record[name]:.2e}" for name in ("lr", "muon_lr") if name in record)
    line = (
        f"step {record['step']}/{max_steps}: loss {record['train_loss']:.4f}{rates}, "
        f"{record['tokens_per_s']:,.0f} tokens/s"
    )
    if "val_loss" in record:
        line += f", val loss {record['val_loss']:.4f} (perplexity {record['val_perplexity']:.2f})"
    return line
