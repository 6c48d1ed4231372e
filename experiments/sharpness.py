"""Edge of stability (Cohen et al., 2021): the top Hessian eigenvalue along two full-batch
gradient-descent runs with different learning rates, against 2 / lr.

Each run trains a small model on one fixed batch of the built-in corpus with plain GD (sgd, no
momentum); every few steps ``gptfn.research.curvature.top_hessian_eigenvalues`` (Lanczos on
Hessian-vector products) measures the sharpness. Writes one PNG and prints a table.

    python experiments/sharpness.py [--steps 300] [--lrs 0.1 0.3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import gptfn
import gptfn.optim as optim
from gptfn.data import CharTokenizer, random_batch, shakespeare
from gptfn.research.curvature import top_hessian_eigenvalues


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=15)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--out", default="docs/figures/sharpness.png")
    args = parser.parse_args()
    torch.set_num_threads(2)
    gptfn.set_runtime_checks(False)
    text = shakespeare()[:200_000]
    tok = CharTokenizer.train(text)
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    batch = random_batch(ids, 64, 32, seed=0, step=0)  # one fixed batch: full-batch GD
    cfg = gptfn.GPTConfig(tok.vocab_size, 32, 2, 2, 32)

    def f(p):
        return gptfn.loss(p, *batch)

    runs = {}
    for lr in args.lrs:
        params = gptfn.init(cfg, seed=0)
        tx = optim.sgd(lr)
        step = gptfn.make_train_step(tx)
        state = tx.init(params)
        points = []
        for s in range(args.steps + 1):
            if s % args.every == 0:
                sharp = float(top_hessian_eigenvalues(f, params, k=1, iters=20, seed=s)[0])
                points.append((s, sharp, float(f(params))))
            if s < args.steps:
                params, state, _ = step(params, state, batch)
        runs[lr] = points
        print(
            f"lr {lr}: 2/lr = {2 / lr:.1f}; sharpness "
            + ", ".join(f"{p[1]:.1f}@{p[0]}" for p in points[:: max(1, len(points) // 6)]),
            flush=True,
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_l) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for (lr, points), color in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green")):
        steps = [p[0] for p in points]
        ax_s.plot(steps, [p[1] for p in points], "o-", color=color, label=f"GD lr {lr}")
        ax_s.axhline(2 / lr, color=color, linestyle="--", alpha=0.7, label=f"2 / lr = {2 / lr:.1f}")
        ax_l.plot(steps, [p[2] for p in points], color=color, label=f"lr {lr}")
    ax_s.set_ylabel("top Hessian eigenvalue")
    ax_s.set_title("sharpness along full-batch GD (edge of stability)")
    ax_s.legend(fontsize=8)
    ax_l.set_ylabel("training loss")
    ax_l.set_xlabel("step")
    for ax in (ax_s, ax_l):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
