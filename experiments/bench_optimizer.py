"""One optimizer step (clip, AdamW, the update applied) on nanoGPT's 4 x 128 parameters: gptfn's
chain (``tx.update`` + ``apply_updates``) vs ``update_and_apply`` (one kernel pass per leaf) vs
``torch.optim.AdamW`` (foreach, as nanoGPT's CPU recipe runs it, and fused) after
``clip_grad_norm_``.

Every runner gets the same fresh gradients each iteration (made outside the timing, norm ~90,
so every step clips to 1), donated where gptfn's train step donates. The runners go in turn, the
order rotated each iteration; medians.

    python experiments/bench_optimizer.py [--steps 300] [--threads 2] [--large]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import optree
import torch

import gptfn
import gptfn.optim as optim
from gptfn.train import OptimizerConfig, keep_freed_memory, make_optimizer
from gptfn.train.step import logged_norm

Runner = Callable[[dict], None]


def gptfn_runner(params: dict, fused: bool) -> Runner:
    """gptfn's train step's optimizer part: the logged norm, then the update, donated."""
    tx = make_optimizer(OptimizerConfig(), total_steps=1000)
    state = [params, tx.init(params)]

    def run(grads: dict) -> None:
        params, opt_state = state
        norm, remember = logged_norm(grads)
        with remember, optim.donated():
            if fused:
                params, opt_state = optim.update_and_apply(tx, grads, opt_state, params)
            else:
                updates, opt_state = tx.update(grads, opt_state, params)
                params = optim.apply_updates(params, updates)
        state[:] = [params, opt_state]
        float(norm)

    return run


def torch_runner(params: dict, fused: bool) -> Runner:
    """nanoGPT's: ``clip_grad_norm_`` then ``AdamW`` over decayed and undecayed groups."""
    leaves = [torch.nn.Parameter(x.clone()) for x in optree.tree_leaves(params)]
    groups = [
        {"params": [p for p in leaves if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in leaves if p.ndim < 2], "weight_decay": 0.0},
    ]
    kind = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(groups, lr=2e-3, betas=(0.9, 0.99), **kind)

    def run(grads: dict) -> None:
        for p, g in zip(leaves, optree.tree_leaves(grads)):
            p.grad = g
        norm = torch.nn.utils.clip_grad_norm_(leaves, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(norm)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="timed iterations of each runner")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--large", action="store_true", help="6 x 384 (10.7 M) instead of 4 x 128")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as gptfn train on a CPU
    shape = (65, 256, 6, 6, 384) if args.large else (65, 64, 4, 4, 128)
    params = gptfn.init(gptfn.GPTConfig(*shape, bias=False, mlp="gelu"), seed=0)
    runners = {
        "gptfn: tx.update + apply_updates": gptfn_runner(params, fused=False),
        "gptfn: update_and_apply": gptfn_runner(params, fused=True),
        "torch AdamW foreach (nanoGPT's)": torch_runner(params, fused=False),
        "torch AdamW fused": torch_runner(params, fused=True),
    }
    names, times = list(runners), {name: [] for name in runners}
    for i in range(args.steps + 5):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            grads = optree.tree_map(lambda x: torch.randn_like(x) * 0.1, params)
            t0 = time.perf_counter()
            runners[name](grads)
            if i >= 5:  # the first five are warm-up
                times[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    base = ms["gptfn: tx.update + apply_updates"]
    size = sum(x.numel() for x in optree.tree_leaves(params))
    print(
        f"\n{shape[2]} layers x {shape[4]}: {size:,} parameters, {args.threads} threads, "
        f"medians of {args.steps}\n"
    )
    print("| optimizer step | ms | vs gptfn's chain |\n|---|---:|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.3f} | {base / value:.2f}x |")


if __name__ == "__main__":
    main()
