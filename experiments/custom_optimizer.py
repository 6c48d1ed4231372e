"""A custom optimizer over the parameter tree in ~15 lines: sign-SGD with momentum and a
per-leaf trust ratio (LARS-flavoured), trained for a few steps on the built-in corpus.

    python experiments/custom_optimizer.py [--steps 200]
"""

from __future__ import annotations

import argparse

import optree
import torch

import gptfn
import gptfn.optim as optim
from gptfn.data import CharTokenizer, random_batch, shakespeare
from gptfn.train import make_train_step


def trust_sign_momentum(lr: float, beta: float = 0.9) -> optim.GradientTransformation:
    """m = beta m + (1 - beta) g; update = -lr * ||p|| / sqrt(numel) * sign(m)."""

    def init(params):
        return {"m": optree.tree_map(torch.zeros_like, params)}

    def update(grads, state, params):
        m = optree.tree_map(lambda m, g: beta * m + (1 - beta) * g, state["m"], grads)
        scale = lambda p: lr * max(float(p.norm()) / p.numel() ** 0.5, 1e-3)  # noqa: E731
        updates = optree.tree_map(lambda m, p: -scale(p) * m.sign(), m, params)
        return updates, {"m": m}

    return optim.GradientTransformation(init, update)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(2)
    text = shakespeare()[:500_000]
    tok = CharTokenizer.train(text)
    data = torch.tensor(tok.encode(text)).numpy()
    params = gptfn.init(gptfn.GPTConfig(tok.vocab_size, 64, 2, 4, 64), seed=0)
    tx = optim.chain(optim.clip_by_global_norm(1.0), trust_sign_momentum(0.01))
    step, state = make_train_step(tx), tx.init(params)
    for s in range(args.steps):
        params, state, metrics = step(params, state, random_batch(data, 16, 64, seed=0, step=s))
        if s % 50 == 0 or s == args.steps - 1:
            print(f"step {s:4d}  loss {float(metrics['loss']):.3f}")


if __name__ == "__main__":
    main()
