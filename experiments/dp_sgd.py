"""DP-SGD on the built-in corpus: the same small model trained privately and non-privately.

The private run takes per-example gradients (``gptfn.per_example_grads``), aggregates them with
``differentially_private_aggregate`` (clip each sequence's gradient, sum, add Gaussian noise)
and applies AdamW; the other run uses the mean gradient. Both print their validation loss.
The privacy budget epsilon is printed only when a maintained accountant package is installed
(``dp-accounting``); gptfn does not implement one.

    python experiments/dp_sgd.py [--steps 300] [--clip 1.0] [--noise 1.0]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import gptfn
import gptfn.optim as optim
from gptfn.data import CharTokenizer, random_batch, shakespeare


def val_loss(params, val: np.ndarray) -> float:
    with torch.no_grad():
        return float(
            torch.stack(
                [gptfn.loss(params, *random_batch(val, 32, 64, 1, i)) for i in range(10)]
            ).mean()
        )


def epsilon(noise: float, batch: int, n_sequences: int, steps: int, delta: float) -> str:
    try:
        import dp_accounting
    except ImportError:
        return "not computed (install dp-accounting for an RDP accountant)"
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(
        batch / n_sequences, dp_accounting.GaussianDpEvent(noise)
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return f"{accountant.get_epsilon(delta):.2f} at delta={delta:g} (RDP, Poisson-sampling approx.)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--noise", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    gptfn.set_runtime_checks(False)
    text = shakespeare()
    tok = CharTokenizer.train(text)
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    train, val = ids[: int(len(ids) * 0.9)], ids[int(len(ids) * 0.9) :]
    cfg = gptfn.GPTConfig(tok.vocab_size, 64, 2, 4, 64)

    results = {}
    for private in (False, True):
        params = gptfn.init(cfg, seed=0)
        adam = optim.adamw(3e-3, weight_decay=0.0)
        if private:
            tx = optim.chain(
                optim.differentially_private_aggregate(args.clip, args.noise, seed=0), adam
            )
        else:
            tx = adam
        state = tx.init(params)
        for s in range(args.steps):
            x, y = random_batch(train, args.batch, 64, seed=0, step=s)
            if private:
                grads, _ = gptfn.per_example_grads(params, x, y)
            else:
                grads = torch.func.grad(gptfn.loss)(params, x, y)
            updates, state = tx.update(grads, state, params)
            params = optim.apply_updates(params, updates)
        results["private" if private else "non-private"] = val_loss(params, val)
    print(f"{args.steps} steps, batch {args.batch} sequences of 64 chars, 2x64 model")
    print("| run | validation loss |\n| --- | ---: |")
    for name, loss in results.items():
        print(f"| {name} | {loss:.3f} |")
    print(
        f"private run: clip {args.clip}, noise multiplier {args.noise}; epsilon: "
        f"{epsilon(args.noise, args.batch, len(train) // 64, args.steps, 1e-5)}"
    )


if __name__ == "__main__":
    main()
