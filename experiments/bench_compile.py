"""Compiled vs eager training, and compile/warm-start times (issue 15).

Every runner does one full training iteration per call (random batch, the step, the loss read
back as a float, as the loop does); the runners of one table alternate call by call so they
share the machine's noise, and the table reports medians after a warm-up call (whose time,
for a compiled runner, is its first compile). Tables:

1. gptfn's train step (``make_train_step`` with the CLI's default optimizer: clipping, AdamW,
   warm-up + cosine schedule) eager vs ``torch.compile(fullgraph=True)``: the default model
   (4 x 128, T=128, batch 32, fp32) and 6 x 384, T=256 in bf16 (and fp32 eager).
2. nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, vocab 65, no bias):
   nanoGPT's ``model.py`` imported from ``--nanogpt DIR`` driven by its ``train.py`` loop
   body (lr set per group, forward, backward, clip 1.0, AdamW step, zero_grad, ``loss.item()``;
   its GradScaler is disabled on CPU), eager and with ``--compile=True`` (``torch.compile(model)``),
   against gptfn's step on the same architecture.
3. ``gptfn train --compile`` and ``gptfn eval --compile`` started twice in fresh processes on an
   empty compile cache: the first compile and the cached (second-run) one.
4. ``--only coldstart``: each compiled nanoGPT-recipe runner built (``torch.compile`` called)
   and called once, each in a fresh process on an empty cache (within one process, a later
   runner reuses kernels compiled for an earlier one); `--rounds N` alternates nanoGPT's and
   `--compile`'s N times, medians; ``--unfrozen`` adds `--compile` without
   ``gptfn.compiling.frozen_heap`` to the rounds.

    python experiments/bench_compile.py --nanogpt /tmp/nanoGPT [--steps 10] [--threads 2]
        [--only default|large|nanogpt|cache|coldstart|profile] [--rounds 5] [--unfrozen]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import gptfn
from gptfn.compiling import frozen_first_call, jit
from gptfn.train import OptimizerConfig, make_optimizer


def interleave(runners: dict[str, Callable[[], None]], steps: int) -> dict[str, dict]:
    """First-call seconds and median ms of each runner, called in turn ``steps`` times, the
    order rotated each time (a step after another runner's finds the caches as it left them)."""
    first = {}
    for name, run in runners.items():
        t0 = time.perf_counter()
        run()
        first[name] = time.perf_counter() - t0
        run()  # a second warm-up call
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for i in range(steps):  # each runner goes first in turn: none always follows the same one
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
    return {n: {"first_s": first[n], "ms": statistics.median(t) * 1e3} for n, t in times.items()}


def gptfn_runner(cfg: gptfn.GPTConfig, batch: int, dtype: str, compile: bool | str) -> Callable:
    """One iteration of gptfn's training step (the CLI's default optimizer); ``compile=True``
    compiles the whole step, ``"loss"`` only the loss (its backward compiled with it) under an
    eager in-place optimizer, as nanoGPT compiles its model and as ``gptfn train --compile``
    does: ``make_train_step(tx, jit(gptfn.loss, ...), donate=True)`` (``gptfn.compiling.jit``:
    ``torch.compile(fullgraph=True, dynamic=False)``), the step's first call with the heap
    frozen (``frozen_first_call``)."""
    params = gptfn.init(cfg, seed=0)
    tx = make_optimizer(OptimizerConfig(), total_steps=1000)
    loss = gptfn.loss
    if compile == "loss":  # gptfn.compiling.jit, as the loop compiles it
        loss = jit(gptfn.loss, "the loss", report=None)
    step = gptfn.make_train_step(tx, loss, dtype=dtype, donate=True)  # as gptfn train runs it
    if compile == "loss":
        step = frozen_first_call(step)  # as the loop does: the backward compiles in it
    if compile is True:
        step = torch.compile(step, fullgraph=True, dynamic=False)
    state = [params, tx.init(params)]
    gen = torch.Generator().manual_seed(0)

    def run() -> None:
        x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=gen)
        params, opt_state, metrics = step(*state, (x[:, :-1].contiguous(), x[:, 1:].contiguous()))
        state[:] = [params, opt_state]
        float(metrics["loss"])

    return run


def nanogpt_runner(model_py: Path, compile: bool, batch: int = 12) -> Callable:
    """One iteration of nanoGPT's train.py loop body at its CPU recipe."""
    sys.path.insert(0, str(model_py.parent))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    sys.path.pop(0)
    cfg = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, bias=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    if compile:
        model = torch.compile(model)
    gen = torch.Generator().manual_seed(0)
    it = [0]

    def run() -> None:
        x = torch.randint(0, 65, (batch, 65), generator=gen)
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (it[0] + 1) / 100)
        _, loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())  # as get_batch gives
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        it[0] += 1

    return run


def print_table(title: str, results: dict[str, dict], ratios: list[tuple[str, str, str, float]]):
    print(f"\n{title}\n\n| runner | ms / iteration (median) | first call (s) |\n|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['ms']:.1f} | {r['first_s']:.1f} |")
    for label, slow, fast, goal in ratios:
        ratio = results[slow]["ms"] / results[fast]["ms"]
        met = "met" if goal is not None and ratio >= goal else "MISSED"
        verdict = "" if goal is None else f" (goal >= {goal}x: {met})"
        print(f"\n{label}: {ratio:.2f}x{verdict}")


def profile(cfg: gptfn.GPTConfig, batch: int, dtype: str, steps: int) -> None:
    """Where a step spends its time, eager and compiled: the top operators by self CPU time."""
    for compile in (False, True):
        run = gptfn_runner(cfg, batch, dtype, compile)
        run(), run()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                run()
        print(f"\n#### {'compiled' if compile else 'eager'} step, {steps} steps profiled\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def compile_times(lines: str) -> dict[str, float]:
    found = re.findall(r"compiled (the [a-z ]+?) in ([0-9.]+) s", lines)
    return {what: float(s) for what, s in found}


def cached_starts(threads: int) -> None:
    """``gptfn train --compile`` then ``gptfn eval --compile``, twice each, on an empty cache."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{tmp}/cache", OMP_NUM_THREADS=str(threads))
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        train = [sys.executable, "-m", "gptfn", "train", "--compile", "--max-steps", "2"]
        train += ["--eval-interval", "2", "--eval-steps", "1", "--no-progress", "--overwrite"]
        evaluate = [sys.executable, "-m", "gptfn", "eval", "--run", "run", "--compile"]
        print("\n| command | run | process wall (s) | train step compile (s) | eval compile (s) |")
        print("|---|---|---:|---:|---:|")
        for label, cmd in (("train", [*train, "--out", "run"]), ("eval", evaluate)):
            for attempt in ("first (empty cache)", "second (cached)"):
                t0 = time.perf_counter()
                out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if out.returncode:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
                t = compile_times(out.stdout + out.stderr)
                step, ev = (
                    t.get(k, float("nan"))
                    for k in ("the train loss and its gradient", "the evaluation")
                )
                print(f"| {label} --compile | {attempt} | {wall:.1f} | {step:.1f} | {ev:.1f} |")


def nanogpt_runners(nanogpt: Path) -> dict[str, Callable[[], Callable]]:
    """Makers of the nanoGPT-recipe runners (built on demand: each compiles on first call)."""
    cfg = gptfn.GPTConfig(65, 64, 4, 4, 128, bias=False, mlp="gelu")  # nanoGPT's exact GELU
    model_py = nanogpt / "model.py"
    return {
        "nanoGPT eager": lambda: nanogpt_runner(model_py, False),
        "nanoGPT compiled": lambda: nanogpt_runner(model_py, True),
        "gptfn eager": lambda: gptfn_runner(cfg, 12, "float32", False),
        "gptfn compiled": lambda: gptfn_runner(cfg, 12, "float32", True),
        "gptfn loss compiled": lambda: gptfn_runner(cfg, 12, "float32", "loss"),
    }


UNFROZEN = ", heap not frozen"  # a cold-start runner's suffix: gptfn.compiling.frozen_heap off


def cold_starts(nanogpt: Path, threads: int, rounds: int, unfrozen: bool = False) -> None:
    """Each compiled runner built and called once in a fresh process on an empty cache (timed
    from ``torch.compile``, which for a module imports inductor at once and for a function on
    its first call: 0.7 s here that timing the first call alone gave nanoGPT), so no kernel that
    another runner compiled earlier in the same process can be reused. ``rounds`` repeats
    nanoGPT's and ``--compile``'s in turn (a cold start varies by ~10 % here run to run) and
    reports the medians; the whole step, far slower to start, runs once. ``unfrozen`` adds
    ``--compile`` without ``frozen_heap`` to the rounds (the ablation of that change)."""

    def first_call(name: str) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tmp)
            cmd = [sys.executable, __file__, "--nanogpt", str(nanogpt), "--threads", str(threads)]
            out = subprocess.run([*cmd, "--first-call", name], env=env, capture_output=True,
                                 text=True, check=True)  # fmt: skip
            return float(out.stdout.strip().splitlines()[-1])

    compared = ("nanoGPT compiled", "gptfn loss compiled")
    compared += ("gptfn loss compiled" + UNFROZEN,) if unfrozen else ()
    times: dict[str, list[float]] = {name: [] for name in compared}
    for _ in range(rounds):
        for name in compared:
            times[name].append(first_call(name))
    times["gptfn compiled"] = [first_call("gptfn compiled")]
    print(
        "\n| runner | built and called once, fresh process, empty cache (s, median) | each round |"
    )
    print("|---|---:|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} | {', '.join(f'{t:.1f}' for t in ts)} |")
    nano = statistics.median(times[compared[0]])
    for name in compared[1:]:
        ratio = statistics.median(times[name]) / nano
        print(f"\n{name} cold start / nanoGPT's: {ratio:.2f}x (goal <= 1.0x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed iterations per runner")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (its model.py)")
    parts = ["default", "large", "nanogpt", "cache", "coldstart", "profile"]
    ap.add_argument("--only", choices=parts, action="append", help="(default: all but profile)")
    ap.add_argument("--rounds", type=int, default=1, help="cold starts per runner (coldstart)")
    ap.add_argument("--unfrozen", action="store_true", help="coldstart: also without frozen_heap")
    ap.add_argument("--first-call", help=argparse.SUPPRESS)  # a worker of --only coldstart
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.first_call:
        if args.first_call.endswith(UNFROZEN):
            gptfn.compiling.frozen_heap = contextlib.nullcontext
            args.first_call = args.first_call.removesuffix(UNFROZEN)
        t0 = time.perf_counter()  # from torch.compile on: compiling a module imports inductor
        run = nanogpt_runners(args.nanogpt)[args.first_call]()  # there, compiling a function
        run()  # on its first call
        print(time.perf_counter() - t0)
        return
    only = set(args.only or parts[:-1])
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # first calls compile from scratch: no
        scratch = tempfile.TemporaryDirectory()  # kernels cached by an earlier run (jit would
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = scratch.name  # pick gptfn's lasting cache)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} timed iterations")
    if "default" in only:
        cfg = gptfn.GPTConfig(65, 128, 4, 4, 128)
        res = interleave(
            {
                "gptfn eager fp32": gptfn_runner(cfg, 32, "float32", False),
                "gptfn compiled fp32": gptfn_runner(cfg, 32, "float32", True),
            },
            args.steps,
        )
        print_table(
            "### default 4 x 128, T=128, batch 32, fp32",
            res,
            [("compiled vs eager", "gptfn eager fp32", "gptfn compiled fp32", 1.15)],
        )
    if "large" in only:
        cfg = gptfn.GPTConfig(65, 256, 6, 6, 384)
        res = interleave(
            {
                "gptfn eager fp32": gptfn_runner(cfg, 8, "float32", False),
                "gptfn eager bf16": gptfn_runner(cfg, 8, "bfloat16", False),
                "gptfn compiled bf16": gptfn_runner(cfg, 8, "bfloat16", True),
            },
            args.steps,
        )
        print_table(
            "### 6 x 384, T=256, batch 8",
            res,
            [
                ("bf16 compiled vs bf16 eager", "gptfn eager bf16", "gptfn compiled bf16", 1.3),
                ("bf16 compiled vs fp32 eager", "gptfn eager fp32", "gptfn compiled bf16", 2.0),
            ],
        )
    if "nanogpt" in only and args.nanogpt is not None:
        makers = nanogpt_runners(args.nanogpt)
        res = interleave({name: make() for name, make in makers.items()}, args.steps)
        print_table(
            "### nanoGPT's CPU recipe: 4 x 128, block 64, batch 12, fp32",
            res,
            [
                ("gptfn eager vs nanoGPT eager", "nanoGPT eager", "gptfn eager", 1.0),
                ("gptfn compiled vs nanoGPT compiled", "nanoGPT compiled", "gptfn compiled", 1.0),
                (
                    "gptfn loss compiled vs nanoGPT compiled",
                    "nanoGPT compiled",
                    "gptfn loss compiled",
                    1.0,
                ),
                ("gptfn compiled vs nanoGPT eager", "nanoGPT eager", "gptfn compiled", None),
                ("gptfn compiled vs gptfn eager", "gptfn eager", "gptfn compiled", None),
            ],
        )
    if "cache" in only:
        cached_starts(args.threads)
    if "coldstart" in only and args.nanogpt is not None:
        cold_starts(args.nanogpt, args.threads, args.rounds, args.unfrozen)
    if "profile" in only:
        profile(gptfn.GPTConfig(65, 128, 4, 4, 128), 32, "float32", 3)


if __name__ == "__main__":
    main()
