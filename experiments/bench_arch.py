"""Is the default (GPT-2) path as fast as before the architecture became data?

Loads ``gptfn/model.py`` as it was at a git revision from before the architecture options
(``git show``, into a temporary module) and times it against today's ``gptfn.forward`` and the
training step built on each (``make_train_step`` with the old or the new ``loss``), alternating
them in one loop on the same weights and batches; prints medians and the ratio now / before.

    python experiments/bench_arch.py [--before df286b1] [--repeats 20] [--threads 2] [--generate 3]
    python experiments/bench_arch.py --package --before 6bcc65c   # the whole package then

``--generate N`` adds greedy decoding at ``bench_generate.py``'s sizes, old generation module
against today's, N rounds.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gptfn
import gptfn.optim as optim


def load_module_at(rev: str, file: str, name: str):
    """``file`` as it was at git revision ``rev``, imported as module ``name``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:{file}"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_model_at(rev: str):
    return load_module_at(rev, "gptfn/model.py", "model_before")


def load_package_at(rev: str):
    """The whole ``gptfn`` package as it was at ``rev``, imported as ``gptfn_before`` (every
    ``gptfn`` name in it rewritten, so both versions live in one process)."""
    root = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "archive", rev, "gptfn"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    (root / "gptfn").rename(root / "gptfn_before")
    for path in (root / "gptfn_before").rglob("*.py"):
        path.write_text(re.sub(r"\bgptfn\b", "gptfn_before", path.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module("gptfn_before")


def bench_generation(rev: str, repeats: int) -> None:
    """Greedy decoding at bench_generate.py's sizes: the old generation module (slice-written
    cache, attention over the filled prefix; run on today's layers, which compute the same ops)
    against today's (static-shape cache written at tensor slots, attention over the buffer)."""
    old = load_module_at(rev, "gptfn/generate.py", "generate_before")
    cfg = gptfn.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    params = gptfn.init(cfg, seed=0)
    old_params = {k: v for k, v in params.items() if k != "config"}
    print("\n| generation, fp32 | batch | before tok/s | now tok/s | now / before (time) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for batch in (1, 16):
        prompts = torch.randint(0, 50257, (batch, 16), generator=torch.Generator().manual_seed(1))
        rows = prompts.tolist()
        a = old.generate(old_params, rows, 8, temperature=0)
        assert a == gptfn.generate(params, rows, 8, temperature=0)  # same tokens
        med = interleaved(
            {"before": lambda: old.generate(old_params, rows, 128, temperature=0),
             "now": lambda: gptfn.generate(params, rows, 128, temperature=0)},
            repeats, warmup=1,
        )  # fmt: skip
        tok = batch * 128
        print(
            f"| 12 x 768 | {batch} | {tok / med['before']:.1f} | {tok / med['now']:.1f} | "
            f"{med['ratio']:.3f} |",
            flush=True,
        )


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, calling them in turn ``repeats`` times (the order
    flips every round, so neither always runs right after the other), and ``ratio``: the
    median over rounds of now / before within the round (neighbours in time share the
    machine's noise, so this is steadier than a ratio of medians)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats + warmup):
        for name, fn in list(fns.items())[:: 1 if r % 2 else -1]:
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out["ratio"] = statistics.median(a / b for a, b in zip(times["now"], times["before"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="df286b1")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generate", type=int, default=0, help="repeats of the decode bench")
    parser.add_argument(
        "--package", action="store_true",
        help="'before' is the whole package at --before (a revision where gptfn/model/ is a "
        "package, e.g. 6bcc65c, before the house moved): its own forward, loss and init",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gptfn.set_runtime_checks(False)  # as in bench_train: measure the model, not the checks
    before = load_package_at(args.before) if args.package else load_model_at(args.before)
    if args.package:
        before.set_runtime_checks(False)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
        f"{args.repeats}, interleaved; 'before' = gptfn/model.py at {args.before}"
    )
    print("| what | model | tokens | before ms | now ms | now / before | median of paired ratios |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    cases = [  # (what, layers, width, heads, batch, seq); the tiny ones show fixed overhead
        ("forward", 4, 128, 4, 32, 128),
        ("forward", 12, 768, 12, 1, 64),
        ("forward", 2, 16, 2, 1, 8),
        ("train step", 4, 128, 4, 32, 128),
        ("train step", 2, 16, 2, 1, 8),
    ]
    for what, n_layer, width, heads, batch, seq in cases:
        cfg = gptfn.GPTConfig(75, max(seq, 128), n_layer, heads, width)
        params = gptfn.init(cfg, seed=0)
        old_params = {k: v for k, v in params.items() if k != "config"}  # as the old init made
        if args.package:  # the old package's own tree (same draws), carrying its own config
            old_params = before.init(before.GPTConfig(75, max(seq, 128), n_layer, heads, width))
        toks = torch.randint(0, 75, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
        x, y = toks[:, :-1], toks[:, 1:]
        repeats = args.repeats * (10 if width < 128 else 1)  # tiny: more rounds, same time
        if what == "forward":
            with torch.no_grad():
                med = interleaved(
                    {"before": lambda: before.forward(old_params, x),
                     "now": lambda: gptfn.forward(params, x)},
                    repeats,
                )  # fmt: skip
        else:
            tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, weight_decay=0.1))
            old_step = gptfn.make_train_step(tx, before.loss)
            new_step = gptfn.make_train_step(tx)
            old_state, new_state = tx.init(old_params), tx.init(params)
            a = old_step(old_params, old_state, (x, y))[2]["loss"]
            b = new_step(params, new_state, (x, y))[2]["loss"]
            assert float(a) == float(b), (float(a), float(b))  # the same function
            med = interleaved(
                {"before": lambda: old_step(old_params, old_state, (x, y)),
                 "now": lambda: new_step(params, new_state, (x, y))},
                repeats,
            )  # fmt: skip
        print(
            f"| {what} | {n_layer} x {width} | {batch} x {seq} | {med['before'] * 1e3:.2f} | "
            f"{med['now'] * 1e3:.2f} | {med['now'] / med['before']:.3f} | {med['ratio']:.3f} |",
            flush=True,
        )
    if args.generate and not args.package:
        bench_generation(args.before, args.generate)


if __name__ == "__main__":
    main()
