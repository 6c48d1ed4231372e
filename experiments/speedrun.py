"""Time to quality: train recipes on the built-in corpus and compare the held-out loss they reach.

Two verbs, so runs can go side by side in separate processes and be reported together:

  python experiments/speedrun.py train --run "muon=gpt2,optimizer=muon" --steps 400 --out DIR
  python experiments/speedrun.py report --out DIR [--timing-steps 12]
  python experiments/speedrun.py time --run A=gpt2 --run B=speedrun   # the timing pass alone
  python experiments/speedrun.py logs runs/gpt2 runs/shakespeare-char   # gptfn train runs
  python experiments/speedrun.py --quick          # a tiny end-to-end check (tests run it)

A run is ``label=recipe[,option=value...]``: ``gptfn train``'s options by name on top of a
recipe (``gpt2`` or ``speedrun``). ``train`` evaluates the held-out loss every
``--eval-every`` steps on a fixed quarter of the validation split (every 4th chunk of 4,096
tokens, scored as ``gptfn eval`` scores: non-overlapping windows of the context length), and at
the end on the full split, and writes ``DIR/<label>.json`` with the curve.

``logs`` reads the ``log.jsonl`` of finished ``gptfn train`` runs (run one after the other on a
quiet machine, their wall times compare directly): steps and seconds to the target and the loss
at each time budget, on the evaluations the runs logged (``--eval-steps`` random validation
batches; ``gptfn eval --run DIR`` gives the full split at the end).

``report`` times one step of every run's recipe side by side in one process, interleaved
(median of ``--timing-steps`` rounds), so per-step times are comparable on a shared, noisy
machine; wall-clock times of the training runs are not. Seconds are then estimated as
``steps x (step time / the baseline's step time) x BASE_SECONDS_PER_STEP``, the baseline's
quiet-machine pace (6 min 45 s for 2,500 steps of ``gptfn train --recipe gpt2``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptfn import init, make_train_step
from gptfn.data import load_meta, load_tokens, prepare, random_batch
from gptfn.evaluate import token_nll
from gptfn.train import make_optimizer
from gptfn.train.options import TrainConfig
from gptfn.tree import param_count

TARGET = 1.585
BASE_SECONDS_PER_STEP = 405 / 2500  # gptfn train (gpt2 recipe), 6 min 45 s, quiet machine
BUDGETS = {"6:45": 405.0, "10:00": 600.0}
DATA = Path("data/shakespeare_char")


def parse_run(text: str) -> tuple[str, dict[str, Any]]:
    """``"label=recipe,opt=value,..."`` -> (label, options); values are JSON or strings."""
    label, _, rest = text.partition("=")
    recipe, *pairs = rest.split(",")
    options: dict[str, Any] = {"recipe": recipe}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            options[name.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[name.replace("-", "_")] = value
    return label, options


def config(options: dict[str, Any], steps: int) -> TrainConfig:
    """The ``gptfn train`` config of a run, with ``steps`` as its schedule length."""
    return TrainConfig().replace(**options).replace(max_steps=steps)


def data_dir(data: Path | None) -> Path:
    """``data``, or the built-in corpus (prepared as ``gptfn train`` does when missing)."""
    if data is not None:
        return data
    if not (DATA / "meta.json").is_file():
        prepare(None, DATA, tokenizer="char", overwrite=True)
    return DATA


def eval_subset(val: np.ndarray, chunk: int = 4096, every: int = 4) -> list[np.ndarray]:
    """Every ``every``-th chunk of ``chunk`` + 1 tokens of the validation split (at least one)."""
    chunk = min(chunk, len(val) - 1)
    starts = range(0, max(len(val) - chunk, 1), chunk * every)
    return [np.asarray(val[s : s + chunk + 1]) for s in starts]


def subset_loss(params: Any, chunks: list[np.ndarray]) -> float:
    """Mean NLL per token over the chunks (each scored as ``gptfn eval`` scores a file)."""
    totals = [token_nll(params, c) for c in chunks]
    return sum(t for t, _ in totals) / sum(n for _, n in totals)


def setup(cfg: TrainConfig, vocab_size: int) -> tuple[Any, Any, Any]:
    """(params, opt_state, step) of a run, as ``gptfn train`` builds them."""
    params = init(
        cfg.model.gpt_config(vocab_size), seed=cfg.run.seed, zero_out_proj=cfg.model.zero_init
    )
    tx = make_optimizer(cfg.optimizer, cfg.run.max_steps)
    step = make_train_step(
        tx, accum_steps=cfg.data.grad_accum, dtype=cfg.run.dtype, dropout=cfg.model.dropout
    )
    return params, tx.init(params), step


def batch(cfg: TrainConfig, train: np.ndarray, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = cfg.data.batch_size * cfg.data.grad_accum
    return random_batch(train, rows, cfg.model.block_size, cfg.run.seed, step)


def train_run(
    label: str, options: dict[str, Any], steps: int, eval_every: int, data: Path, quick: bool
) -> dict[str, Any]:
    """Train one run; returns its curve and the full-split loss at the end."""
    cfg = config(options, steps)
    train, val = load_tokens(data, "train"), load_tokens(data, "val")
    chunks = eval_subset(val, chunk=512 if quick else 4096)
    params, state, step_fn = setup(cfg, load_meta(data)["vocab_size"])
    curve, start = [], time.perf_counter()
    for i in range(steps):
        params, state, metrics = step_fn(params, state, batch(cfg, train, i))
        if not math.isfinite(float(metrics["loss"])):
            curve.append({"step": i + 1, "val": math.inf})
            break
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            curve.append({"step": i + 1, "val": subset_loss(params, chunks)})
            print(f"{label} step {i + 1}: {curve[-1]['val']:.4f}", flush=True)
    full = token_nll(params, np.asarray(val[:8193] if quick else val))
    return {
        "label": label,
        "options": options,
        "steps": steps,
        "curve": curve,
        "full_val": full[0] / full[1],
        "params": param_count(params),
        "wall_seconds": time.perf_counter() - start,
    }


def steps_to(curve: list[dict[str, float]], target: float, at: str = "step") -> float | None:
    """The first step (or, with ``at="time"``, second) the curve reaches ``target`` (linear
    between evaluations), or None."""
    before = {at: 0, "val": math.inf}
    for point in curve:
        if point["val"] <= target:
            if not math.isfinite(before["val"]):
                return float(point[at])
            share = (before["val"] - target) / (before["val"] - point["val"])
            return before[at] + share * (point[at] - before[at])
        before = point
    return None


def loss_at(curve: list[dict[str, float]], x: float, at: str = "step") -> float | None:
    """The curve's loss at step (or ``at="time"``: second) ``x``, linear between evaluations;
    None past its end."""
    before = None
    for point in curve:
        if point[at] >= x:
            if before is None:
                return point["val"]
            share = (x - before[at]) / (point[at] - before[at])
            return before["val"] + share * (point["val"] - before["val"])
        before = point
    return None


def log_curve(run: Path) -> tuple[list[dict[str, float]], list[float]]:
    """(evaluations as ``{"step", "time", "val"}``, tokens/s of every record) of a ``gptfn
    train`` run directory, read from its ``log.jsonl``."""
    path = run / "log.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run}: no log.jsonl (not a gptfn train run directory)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    curve = [
        {"step": r["step"], "time": r["time"], "val": r["val_loss"]}
        for r in records
        if "val_loss" in r
    ]
    return curve, [r["tokens_per_s"] for r in records if "tokens_per_s" in r]


def logs_report(runs: list[Path]) -> str:
    """The markdown table of finished ``gptfn train`` runs, read off their logs."""
    lines = [
        f"| run | steps | tokens/s (median) | steps to {TARGET} | s to {TARGET} | "
        + " | ".join(f"loss at {k}" for k in BUDGETS)
        + " | last evaluation |",
        "| --- | ---: | ---: | ---: | ---: | " + "---: | " * len(BUDGETS) + "---: |",
    ]
    for run in runs:
        curve, speeds = log_curve(run)
        if not curve:
            raise SystemExit(f"{run}: its log has no evaluation")
        last = curve[-1]
        hit, when = steps_to(curve, TARGET), steps_to(curve, TARGET, at="time")
        budget = [loss_at(curve, seconds, at="time") for seconds in BUDGETS.values()]
        cells = [
            run.name,
            f"{last['step']:,}",
            f"{statistics.median(speeds):,.0f}",
            "-" if hit is None else f"{hit:,.0f}",
            "-" if when is None else f"{when:.0f}",
            *(f"{last['val']:.3f} (ended)" if v is None else f"{v:.3f}" for v in budget),
            f"{last['val']:.3f} @ {last['time']:.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "\nseconds: of training, from the log's clock (startup and corpus preparation not "
        "included); evaluations: the run's --eval-steps random validation batches; 'loss at' "
        "interpolates between them ('ended': the run was done earlier, at its last loss)."
    )
    return "\n".join(lines)


def time_steps(runs: list[dict[str, Any]], rounds: int, data: Path) -> dict[str, float]:
    """Median seconds per step of each run's recipe, the recipes interleaved in one process."""
    train = load_tokens(data, "train")
    vocab = load_meta(data)["vocab_size"]
    built = {}
    for run in runs:
        cfg = config(run["options"], run["steps"])
        built[run["label"]] = (cfg, *setup(cfg, vocab))
    times: dict[str, list[float]] = {label: [] for label in built}
    for r in range(rounds + 2):  # two warm-up rounds
        for label, (cfg, params, state, step_fn) in built.items():
            xy = batch(cfg, train, r)
            start = time.perf_counter()
            params, state, metrics = step_fn(params, state, xy)
            float(metrics["loss"])
            if r >= 2:
                times[label].append(time.perf_counter() - start)
            built[label] = (cfg, params, state, step_fn)
    return {label: statistics.median(t) for label, t in times.items()}


def report(runs: list[dict[str, Any]], step_time: dict[str, float], base: str) -> str:
    """The markdown table of the runs."""
    lines = [
        f"| run | params | tokens/s (timing pass) | s/step rel. {base} | steps to {TARGET} | "
        f"est. s to {TARGET} | loss at 6:45 | loss at 10:00 | final (full split) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        cfg = config(run["options"], run["steps"])
        tokens = cfg.data.batch_size * cfg.data.grad_accum * cfg.model.block_size
        rel = step_time[run["label"]] / step_time[base]
        seconds_per_step = rel * BASE_SECONDS_PER_STEP
        hit = steps_to(run["curve"], TARGET)
        at = {k: loss_at(run["curve"], v / seconds_per_step) for k, v in BUDGETS.items()}
        cells = [
            run["label"],
            f"{run['params'] / 1e6:.2f} M",
            f"{tokens / step_time[run['label']]:,.0f}",
            f"{rel:.2f}",
            "-" if hit is None else f"{hit:.0f}",
            "-" if hit is None else f"{hit * seconds_per_step:.0f}",
            *("-" if v is None else f"{v:.3f}" for v in at.values()),
            f"{run['full_val']:.3f} @ {run['steps']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\nest. s = steps x (s/step rel. {base}) x {BASE_SECONDS_PER_STEP:.3f} s ({base}'s quiet "
        "pace); curves: the validation quarter; 'loss at' reads the curve at the step the "
        "time budget allows (- : the run ended earlier)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("verb", nargs="?", choices=("train", "report", "time", "logs"))
    p.add_argument("dirs", nargs="*", type=Path, help="logs: gptfn train run directories")
    p.add_argument("--run", action="append", default=[], help="label=recipe[,opt=value...]")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("runs/speedrun"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--timing-steps", type=int, default=12)
    p.add_argument("--base", default="gpt2", help="label of the baseline run (report)")
    p.add_argument("--data", type=Path, default=None, help="prepared data (default: built-in)")
    p.add_argument("--quick", action="store_true", help="tiny end-to-end check")
    args = p.parse_args(argv)
    if args.verb == "logs":
        print(logs_report(args.dirs))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    data = data_dir(args.data)
    if args.quick:
        return quick(data)
    if args.verb == "train":
        args.out.mkdir(parents=True, exist_ok=True)
        for text in args.run:
            label, options = parse_run(text)
            result = train_run(label, options, args.steps, args.eval_every, data, False)
            (args.out / f"{label}.json").write_text(json.dumps(result, indent=1))
        return 0
    if args.verb == "time":  # the timing pass alone, for runs not (yet) trained
        runs = [dict(zip(("label", "options"), parse_run(t)), steps=args.steps) for t in args.run]
        step_time = time_steps(runs, args.timing_steps, data)
        first = runs[0]["label"]
        for label, seconds in step_time.items():
            ratio = seconds / step_time[first]
            print(f"{label}: {seconds * 1e3:.0f} ms/step, {ratio:.3f} x {first}", flush=True)
        return 0
    runs = [json.loads(f.read_text()) for f in sorted(args.out.glob("*.json"))]
    if not any(r["label"] == args.base for r in runs):
        raise SystemExit(f"no run labelled {args.base!r} in {args.out} (--base)")
    step_time = time_steps(runs, args.timing_steps, data)
    print(report(runs, step_time, args.base))
    return 0


def quick(data: Path) -> int:
    """Two tiny recipes for a few steps, then the report: the whole path in seconds."""
    tiny = "n_layer=1,n_embd=32,n_head=2,block_size=32,batch_size=4,warmup_steps=2"
    runs = []
    for text in (f"gpt2=gpt2,{tiny}", f"speedrun=speedrun,{tiny}"):
        label, options = parse_run(text)
        runs.append(train_run(label, options, 6, 3, data, True))
    print(report(runs, time_steps(runs, 2, data), "gpt2"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
