"""Per-example gradients: vmap(grad) with each attention path against a Python loop over rows.

``gptfn.per_example_grads`` runs attention through SDPA's math backend under vmap(grad). This
script measures that choice against the alternatives: the explicit reference attention, the
fused flash kernel (whose backward has no batching rule, so torch falls back to a per-example
loop and warns), and a plain loop of ``torch.func.grad`` over the rows.

    python experiments/per_example.py [--batch 16] [--seq 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import gptfn
import gptfn.model.attention


def timed(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    gptfn.set_runtime_checks(False)
    print(f"batch {args.batch} x {args.seq} tokens, fp32; median ms of 5")
    print(
        "| model | loop of grad | vmap, SDPA math (default) | vmap, reference attention | "
        "vmap, fused SDPA | default speed-up over loop |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for n_layer, width in ((2, 64), (4, 128)):
        cfg = gptfn.GPTConfig(65, args.seq, n_layer, 4, width)
        params = gptfn.init(cfg)
        x = torch.randint(0, 65, (args.batch, args.seq))
        y = torch.randint(0, 65, (args.batch, args.seq))

        def loop():
            return [
                torch.func.grad(gptfn.loss)(params, x[i : i + 1], y[i : i + 1])
                for i in range(args.batch)
            ]

        default = timed(lambda: gptfn.per_example_grads(params, x, y))
        reference = timed(lambda: gptfn.per_example_grads(params, x, y, attention="reference"))
        automatic = gptfn.model.attention.needs_math_sdpa
        gptfn.model.attention.needs_math_sdpa = lambda: False  # force the fused kernel (internal)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused = timed(lambda: gptfn.per_example_grads(params, x, y))
        gptfn.model.attention.needs_math_sdpa = automatic
        warned = any("performance drop" in str(w.message) for w in caught)
        looped = timed(loop)
        print(
            f"| {n_layer} x {width} | {looped:.0f} | {default:.0f} | {reference:.0f} | "
            f"{fused:.0f}{' (warns)' if warned else ''} | {looped / default:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
