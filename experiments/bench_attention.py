"""bfloat16 attention on CPU: gptfn's own paths against SDPA's fused kernel (issue 25).

SDPA's CPU kernel takes bfloat16 through float32 blocks and is slow here, forward and (far
more) backward. gptfn's ``attend`` therefore has two paths of its own for bfloat16 on CPU:

1. without gradients (prefill, evaluation): ``_blocked_attention``, float32 scores a block of
   query rows at a time, each block stopping at its last visible key;
2. under gradients (autocast training): ``_composed_attention``, ``baddbmm`` + softmax + ``bmm``
   with bfloat16 scores, while the scores fit ``_COMPOSED_SCORE_BYTES``.

Tables: each path against SDPA on the same tensors (medians, the two alternated call by call)
with the RMS error of each against float64 attention; then whole bfloat16 train steps
(``make_train_step``, the CLI's optimizer) with the composed path on and off, alternated.

    python experiments/bench_attention.py [--repeats 9] [--steps 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import gptfn
from gptfn.model import attend
from gptfn.model import attention as paths

sys.path.insert(0, str(Path(__file__).parent))
from bench_compile import gptfn_runner, interleave


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, called in turn ``repeats`` times after warm-up."""
    return {name: r["ms"] for name, r in interleave(fns, repeats).items()}  # type: ignore[arg-type]


def qkv(batch: int, heads: int, kv: int, n: int, d: int) -> list[torch.Tensor]:
    """bfloat16 queries [batch n heads d], keys and values [batch n kv d], scores of order 1-5."""
    g = torch.Generator().manual_seed(n)
    shapes = [(batch, n, heads, d), (batch, n, kv, d), (batch, n, kv, d)]
    return [(torch.randn(s, generator=g) * 2).bfloat16() for s in shapes]


def rms(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth).pow(2).mean().sqrt().item()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    heads_first = (t.transpose(1, 2) for t in (q, k, v))
    return paths._sdpa(*heads_first, None, q.shape[-1] ** -0.5).transpose(1, 2)


def inference_table(repeats: int) -> None:
    print("\n### no gradients: SDPA vs the blocked path (causal, 32 heads over 8, d_head 64)\n")
    print("| queries | SDPA (ms) | blocked (ms) | speed-up | SDPA error | blocked error |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in (64, 128, 256, 512, 1024, 2048):
        q, k, v = qkv(1, 32, 8, n, 64)
        truth = attend(q.double(), k.double(), v.double(), impl="reference")
        with torch.no_grad():
            ms = alternate(
                {"sdpa": lambda: sdpa(q, k, v), "ours": lambda: attend(q, k, v)}, repeats
            )
            errors = rms(sdpa(q, k, v), truth), rms(attend(q, k, v), truth)
        print(f"| {n} | {ms['sdpa']:.2f} | {ms['ours']:.2f} | {ms['sdpa'] / ms['ours']:.2f}x | "
              f"{errors[0]:.2e} | {errors[1]:.2e} |")  # fmt: skip


def forward_backward(fn: Callable, tensors: list[torch.Tensor], up: torch.Tensor) -> list:
    leaves = [t.detach().requires_grad_() for t in tensors]
    z = fn(*leaves)
    return [z, *torch.autograd.grad(z, leaves, up.to(z.dtype))]


def training_table(repeats: int) -> None:
    print("\n### under gradients, forward + backward: SDPA vs the composed path (causal)\n")
    print("| batch x heads x tokens x d_head | SDPA (ms) | composed (ms) | speed-up | "
          "SDPA error (z, dq) | composed error (z, dq) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for batch, heads, n, d in (
        (12, 4, 64, 32),
        (32, 4, 128, 32),
        (8, 6, 256, 64),
        (1, 32, 512, 64),
    ):
        q, k, v = qkv(batch, heads, heads, n, d)
        up = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
        f64 = [t.double() for t in (q, k, v)]
        truth = forward_backward(lambda *x: attend(*x, impl="reference"), f64, up)
        runs = {"sdpa": sdpa, "ours": attend}
        calls = {name: lambda f=f: forward_backward(f, [q, k, v], up) for name, f in runs.items()}
        ms = alternate(calls, repeats)
        err = {name: [rms(x, t) for x, t in zip(forward_backward(f, [q, k, v], up)[:2], truth)]
               for name, f in runs.items()}  # fmt: skip
        print(f"| {batch} x {heads} x {n} x {d} | {ms['sdpa']:.2f} | {ms['ours']:.2f} | "
              f"{ms['sdpa'] / ms['ours']:.2f}x | {err['sdpa'][0]:.1e}, {err['sdpa'][1]:.1e} | "
              f"{err['ours'][0]:.1e}, {err['ours'][1]:.1e} |")  # fmt: skip


def step_table(steps: int) -> None:
    print("\n### bfloat16 autocast train steps (eager), composed path off (SDPA) and on\n")
    print("| model | SDPA (ms) | composed (ms) | speed-up |\n| --- | ---: | ---: | ---: |")
    budget = paths._COMPOSED_SCORE_BYTES
    for cfg, batch in ((gptfn.GPTConfig(65, 128, 4, 4, 128), 32),
                       (gptfn.GPTConfig(65, 256, 6, 6, 384), 8)):  # fmt: skip
        run = gptfn_runner(cfg, batch, "bfloat16", False)

        def with_budget(nbytes: int) -> Callable[[], None]:
            def step() -> None:
                paths._COMPOSED_SCORE_BYTES = nbytes
                run()

            return step

        res = interleave({"sdpa": with_budget(0), "ours": with_budget(budget)}, steps)
        paths._COMPOSED_SCORE_BYTES = budget
        a, b = res["sdpa"]["ms"], res["ours"]["ms"]
        name = f"{cfg.n_layer} x {cfg.n_embd}, T={cfg.block_size}, batch {batch}"
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9, help="alternated calls per kernel timing")
    ap.add_argument("--steps", type=int, default=8, help="alternated train steps per model")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    inference_table(args.repeats)
    training_table(args.repeats)
    step_table(args.steps)


if __name__ == "__main__":
    main()
