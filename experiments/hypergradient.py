"""Hyper-gradient descent on the learning rate, through the optimizer.

Every 3 steps the learning rate's log is moved against the meta-gradient: the gradient, taken
with ``torch.func.grad`` through 3 unrolled ``make_train_step`` calls (AdamW with the learning
rate injected as a tensor), of the loss on a held-out batch. Plots the learning rate and the
training loss against the step.

    python experiments/hypergradient.py [--rounds 40] [--out docs/figures/hypergradient.png]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import gptfn
import gptfn.optim as optim
from gptfn.data import CharTokenizer, random_batch, shakespeare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--init-lr", type=float, default=1e-4)
    parser.add_argument("--unroll", type=int, default=3)
    parser.add_argument("--meta-lr", type=float, default=10.0)
    parser.add_argument("--out", default="docs/figures/hypergradient.png")
    args = parser.parse_args()
    torch.set_num_threads(2)
    gptfn.set_runtime_checks(False)
    text = shakespeare()[:1_000_000]
    tok = CharTokenizer.train(text)
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    params = gptfn.init(gptfn.GPTConfig(tok.vocab_size, 32, 2, 4, 32), seed=0)
    tx = optim.inject_hyperparams(optim.adamw)(learning_rate=args.init_lr, weight_decay=0.0)
    step = gptfn.make_train_step(tx)
    state = tx.init(params)
    log_lr = torch.tensor(float(np.log(args.init_lr)))
    history = []
    for r in range(args.rounds):
        batches = [
            random_batch(ids, 16, 32, seed=0, step=r * args.unroll + k) for k in range(args.unroll)
        ]
        held_out = random_batch(ids, 16, 32, seed=1, step=r)

        def loss_after_unroll(h: torch.Tensor, params=params, state=state, batches=batches):
            s = optim.set_hyperparams(state, learning_rate=h.exp())
            for batch in batches:
                params, s, _ = step(params, s, batch)
            return gptfn.loss(params, *held_out)

        meta = torch.func.grad(loss_after_unroll)(log_lr)
        log_lr = log_lr - (args.meta_lr * meta).clamp(-0.3, 0.3)  # at most x1.35 a round
        state = optim.set_hyperparams(state, learning_rate=log_lr.exp())
        for batch in batches:  # the real steps, with the updated learning rate
            params, state, metrics = step(params, state, batch)
        history.append((r * args.unroll, float(log_lr.exp()), float(metrics["loss"])))
        if r % 10 == 0 or r == args.rounds - 1:
            print(
                f"step {history[-1][0]:4d}  lr {history[-1][1]:.2e}  loss {history[-1][2]:.3f}"
                f"  d loss / d log lr {float(meta):+.3f}",
                flush=True,
            )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lr, ax_loss) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    steps = [h[0] for h in history]
    ax_lr.plot(steps, [h[1] for h in history], color="tab:green")
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("hyper-gradient descent on the learning rate (3-step unroll)")
    ax_loss.plot(steps, [h[2] for h in history])
    ax_loss.set_ylabel("train loss")
    ax_loss.set_xlabel("step")
    for ax in (ax_lr, ax_loss):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
