"""A learning-rate sweep as ONE vmapped training run, and what vmap buys over a Python loop.

Part 1 trains 8 members (own seed, own learning rate) on the built-in corpus with
``vmap(make_train_step(tx))`` and plots their validation curves into one PNG. Part 2 times the
vmapped step against a loop over the members at two model sizes.

    python experiments/ensemble_sweep.py [--steps 300] [--out docs/figures/ensemble_sweep.png]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import gptfn
import gptfn.optim as optim
from gptfn.data import CharTokenizer, random_batch, shakespeare

LRS = [3e-4, 6e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]


def corpus() -> tuple[int, np.ndarray, np.ndarray]:
    text = shakespeare()
    tok = CharTokenizer.train(text)
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    cut = int(len(ids) * 0.9)
    return tok.vocab_size, ids[:cut], ids[cut:]


def sweep(steps: int, out: str) -> None:
    vocab, train, val = corpus()
    cfg = gptfn.GPTConfig(vocab, 64, 2, 4, 64)
    tx = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=0.1)
    step = torch.func.vmap(gptfn.make_train_step(tx), in_dims=(0, 0, None))
    params = gptfn.tree.stack([gptfn.init(cfg, seed=s) for s in range(len(LRS))])
    state = optim.set_hyperparams(torch.func.vmap(tx.init)(params), learning_rate=torch.tensor(LRS))
    evaluate = torch.func.vmap(gptfn.loss, in_dims=(0, None, None))
    val_batches = [random_batch(val, 32, 64, seed=1, step=i) for i in range(8)]
    curves: list[tuple[int, list[float]]] = []
    for s in range(steps + 1):
        if s % 25 == 0:
            with torch.no_grad():
                losses = torch.stack([evaluate(params, *b) for b in val_batches]).mean(0)
            curves.append((s, losses.tolist()))
        if s < steps:
            params, state, _ = step(params, state, random_batch(train, 16, 64, seed=0, step=s))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [c[0] for c in curves]
    for i, lr in enumerate(LRS):
        ax.plot(xs, [c[1][i] for c in curves], label=f"lr {lr:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title(f"8 learning rates, one vmapped run ({cfg.n_layer}x{cfg.n_embd}, char level)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    final = curves[-1][1]
    print("| lr | final val loss |\n| ---: | ---: |")
    for lr, v in zip(LRS, final):
        print(f"| {lr:g} | {v:.3f} |")


def timing(repeats: int = 6) -> None:
    print(
        "\n| model | batch per member | vmapped step of 8 (ms) | loop over 8 (ms) | loop / vmap |"
    )
    print("| --- | --- | ---: | ---: | ---: |")
    gptfn.set_runtime_checks(False)
    for n_layer, width in ((2, 64), (4, 128)):
        for rows, seq in ((4, 32), (16, 64)):
            cfg = gptfn.GPTConfig(65, seq, n_layer, 4, width)
            tx = optim.inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=0.1)
            step = gptfn.make_train_step(tx)
            vstep = torch.func.vmap(step, in_dims=(0, 0, None))
            members = [gptfn.init(cfg, seed=s) for s in range(8)]
            stacked = gptfn.tree.stack(members)
            vstate = torch.func.vmap(tx.init)(stacked)
            states = [tx.init(p) for p in members]
            batch = (torch.randint(0, 65, (rows, seq)), torch.randint(0, 65, (rows, seq)))
            t_v, t_l = [], []
            for r in range(repeats + 1):
                t0 = time.perf_counter()
                vstep(stacked, vstate, batch)
                t1 = time.perf_counter()
                for p, s in zip(members, states):
                    step(p, s, batch)
                t2 = time.perf_counter()
                if r >= 1:
                    t_v.append(t1 - t0)
                    t_l.append(t2 - t1)
            v, loop = statistics.median(t_v) * 1e3, statistics.median(t_l) * 1e3
            print(
                f"| {n_layer} x {width} | {rows} x {seq} | {v:.1f} | {loop:.1f} | "
                f"{loop / v:.2f}x |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="docs/figures/ensemble_sweep.png")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sweep(args.steps, args.out)
    timing()


if __name__ == "__main__":
    main()
