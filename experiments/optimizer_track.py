"""An optimizer track: the same model, data and step budget for every optimizer, each tuned over
a small learning-rate grid, then run on fresh seeds; steps to a target loss and final loss.

    python experiments/optimizer_track.py                       # sgd adamw lion muon + LAMB
    python experiments/optimizer_track.py --optimizer mypkg.mymodule:make_tx --user-grid 1e-3,3e-3
    python experiments/optimizer_track.py --quick               # seconds: a smoke test

Protocol. Model: a 2-layer, 64-wide GPT (4 heads, context 64) on the built-in corpus, char
level, prepared as ``gptfn prepare`` does (the same train/val split as ``gptfn train``). Every
run: 400 steps of 32 sequences, linear warm-up over 40 steps then cosine decay to a tenth of the
peak, gradients clipped to norm 1, the other settings gptfn's defaults (``OptimizerConfig``). The
held-out loss is measured every 20 steps on 8 fixed validation batches (16k characters).
Tuning: each optimizer runs every learning rate of its grid on the tuning seed (0); the one with
the lowest final loss is then run on seeds 1..N (fresh inits and batch orders), which give the
reported figures. A grid whose best value is at its edge is flagged. Muon's grid is its
``muon_lr`` (its AdamW part, for embeddings, biases and norms, stays at ``lr`` 3e-3).

A user optimizer (``--optimizer module.path:function``, repeatable) goes through exactly the
path of ``gptfn train --optimizer``: ``make_optimizer`` imports it and calls it with the schedule
and the options its signature names (see ``gptfn.train.user_optimizer``). Step counts do not
depend on the machine's load; the seconds do (a shared 2-core CPU is noisy), so steps-to-target
is the headline.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import gptfn
import gptfn.train.optimizer_options as train_options
from gptfn.data import load_meta, load_tokens, prepare, random_batch, shakespeare
from gptfn.train import make_train_step

GRIDS = {
    "sgd": (0.1, 0.3, 1.0),
    "adamw": (3e-3, 1e-2, 3e-2),
    "lion": (1e-3, 3e-3, 1e-2),
    "muon": (0.01, 0.03, 0.1),
}
EXAMPLE_USER = "my_optimizers.lamb:lamb"
USER_GRID = (3e-3, 1e-2, 3e-2, 1e-1)
MUON_ADAM_LR = 3e-3


@dataclass(frozen=True)
class Setup:
    """The fixed part of the track: model, data budget, schedule, evaluation."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    block_size: int = 64
    batch_size: int = 32
    steps: int = 400
    warmup: int = 40
    eval_every: int = 20
    eval_batches: int = 8
    target: float = 2.3
    chars: int | None = None  # use only the corpus's first N characters (quick mode)


QUICK = Setup(1, 16, 2, 16, 4, steps=8, warmup=2, eval_every=2, eval_batches=2, target=3.9,
              chars=50_000)  # fmt: skip


@dataclass
class Result:
    steps_to_target: int | None
    final_loss: float
    seconds: float


def load_data(setup: Setup) -> tuple[np.ndarray, np.ndarray, int]:
    """Train and validation tokens of the built-in corpus (char level) and the vocabulary."""
    with tempfile.TemporaryDirectory() as tmp:
        source = None
        if setup.chars is not None:
            source = f"{tmp}/text.txt"
            with open(source, "w", encoding="utf-8") as f:
                f.write(shakespeare()[: setup.chars])
        prepare(source, f"{tmp}/char", tokenizer="char")
        train, val = (np.array(load_tokens(f"{tmp}/char", s)) for s in ("train", "val"))
        return train, val, load_meta(f"{tmp}/char")["vocab_size"]


def optimizer_config(name: str, lr: float, setup: Setup) -> train_options.OptimizerConfig:
    """The run's optimizer settings with peak learning rate ``lr`` (Muon: ``muon_lr``)."""
    peak = dict(lr=MUON_ADAM_LR, min_lr=MUON_ADAM_LR / 10, muon_lr=lr) if name == "muon" else {}
    peak = peak or dict(lr=lr, min_lr=lr / 10)
    return train_options.OptimizerConfig(optimizer=name, warmup_steps=setup.warmup, **peak)


def run_one(name: str, lr: float, seed: int, setup: Setup, data: tuple) -> Result:
    """Train once; the held-out loss every ``eval_every`` steps gives steps-to-target."""
    train, val, vocab = data
    model = gptfn.GPTConfig(vocab, setup.block_size, setup.n_layer, setup.n_head, setup.n_embd)
    params = gptfn.init(model, seed=seed)
    tx = train_options.make_optimizer(optimizer_config(name, lr, setup), setup.steps)
    step, state = make_train_step(tx), tx.init(params)
    val_batches = [
        random_batch(val, setup.batch_size, setup.block_size, 10_000, i)
        for i in range(setup.eval_batches)
    ]
    reached, held_out, start = None, math.inf, time.perf_counter()
    for i in range(setup.steps):
        batch = random_batch(train, setup.batch_size, setup.block_size, seed, i)
        params, state, _ = step(params, state, batch)
        if (i + 1) % setup.eval_every == 0 or i + 1 == setup.steps:
            with torch.no_grad():
                held_out = statistics.fmean(float(gptfn.loss(params, *b)) for b in val_batches)
            if not math.isfinite(held_out):
                break  # diverged: its final loss is inf
            if reached is None and held_out <= setup.target:
                reached = i + 1
    return Result(reached, held_out, time.perf_counter() - start)


def tune(name: str, grid: tuple[float, ...], setup: Setup, data: tuple) -> tuple[float, str]:
    """Each learning rate of ``grid`` on the tuning seed (0); the best (lowest final loss) and a
    printed line per value."""
    finals = []
    for lr in grid:
        result = run_one(name, lr, 0, setup, data)
        finals.append(result.final_loss)
        hit = result.steps_to_target or "-"
        print(f"  tune {name:<24} lr {lr:<8g} final {result.final_loss:.4f}  to target {hit}")
    best = min(range(len(grid)), key=lambda k: finals[k])
    edge = " (at the grid's edge)" if len(grid) > 1 and best in (0, len(grid) - 1) else ""
    return grid[best], edge


def spread(values: list[float], digits: int) -> str:
    """``mean ± std [min, max]`` of ``values``."""
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    fmt = f".{digits}f"
    return (f"{statistics.fmean(values):{fmt}} ± {std:{fmt}} "
            f"[{min(values):{fmt}}, {max(values):{fmt}}]")  # fmt: skip


def table_row(name: str, lr: float, edge: str, results: list[Result]) -> str:
    reached = [r.steps_to_target for r in results if r.steps_to_target is not None]
    finals = [r.final_loss for r in results]
    seconds = statistics.median(r.seconds for r in results)
    return (f"| {name} | {lr:g}{edge and ' (edge)'} | {spread(reached, 0)} "
            f"({len(reached)}/{len(results)}) | {spread(finals, 4)} | {seconds:.0f} |")  # fmt: skip


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be > 0")
        return value

    return parse


def _grid(text: str) -> tuple[float, ...]:
    return tuple(_positive(float)(x) for x in text.split(","))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", action="append", metavar="MODULE:FUNCTION",
                   help=f"a user optimizer (repeatable; default {EXAMPLE_USER})")  # fmt: skip
    shown = ",".join(map(str, USER_GRID))
    p.add_argument("--user-grid", type=_grid, default=USER_GRID,
                   help=f"learning rates for user optimizers (default {shown})")  # fmt: skip
    p.add_argument("--only", help="comma-separated built-ins to run (default all; then the "
                   f"example {EXAMPLE_USER} only if no --optimizer is given)")  # fmt: skip
    p.add_argument("--seeds", type=_positive(int), default=3, help="reported seeds (default 3)")
    p.add_argument("--target", type=_positive(float), help="target held-out loss (default 2.3)")
    p.add_argument("--steps", type=_positive(int), help="step budget (default 400)")
    p.add_argument("--threads", type=_positive(int), default=1, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="a tiny model, a few steps: a smoke test")
    args = p.parse_args(argv)
    for spec in args.optimizer or []:
        try:
            train_options.OptimizerConfig(optimizer=spec)  # the same checks as gptfn train's
        except train_options.OptionError as err:
            p.error(f"argument --optimizer: invalid value {spec!r}: {err.problem}")
    if args.optimizer is None:
        args.optimizer = [] if args.only else [EXAMPLE_USER]
    args.only = args.only.split(",") if args.only else list(GRIDS)
    if unknown := [name for name in args.only if name not in GRIDS]:
        p.error(f"argument --only: invalid value {unknown[0]!r}: one of {', '.join(GRIDS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, list[Result]]:
    """Run the track and print the table; returns each optimizer's seed results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = QUICK if args.quick else Setup()
    overrides = {k: v for k, v in (("target", args.target), ("steps", args.steps)) if v}
    setup = Setup(**{**setup.__dict__, **overrides})
    grids = {name: GRIDS[name] for name in args.only}
    grids |= {spec: args.user_grid for spec in args.optimizer}
    if args.quick:
        grids = {name: grid[1:3] for name, grid in grids.items()}  # two values each
    data = load_data(setup)
    print(f"setup: {setup}\nseeds: tuning 0, reported 1..{args.seeds}; threads {args.threads}")
    print("grids: " + "; ".join(f"{n} {', '.join(map(str, g))}" for n, g in grids.items()))
    rows, results = [], {}
    for name, grid in grids.items():
        lr, edge = tune(name, grid, setup, data)
        results[name] = [run_one(name, lr, s, setup, data) for s in range(1, args.seeds + 1)]
        rows.append(table_row(name, lr, edge, results[name]))
        print(f"  {name}: best lr {lr:g}{edge}", flush=True)
    print(f"\ntarget held-out loss {setup.target}, {setup.steps} steps, seeds 1..{args.seeds}")
    print("| optimizer | lr (tuned) | steps to target: mean ± std [min, max] (reached) | "
          "final loss: mean ± std [min, max] | s/run (median) |")  # fmt: skip
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return results


if __name__ == "__main__":
    main()
