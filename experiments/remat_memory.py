"""Peak memory of one training step with and without activation checkpointing (``remat``).

Each variant runs in its own fresh process (peak RSS only grows, so one process per variant) and
reports the step's peak resident memory above the process's state just before the step. It
also checks that both variants give the same loss.

    python experiments/remat_memory.py [--layers 8] [--width 256] [--seq 512] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def run_variant(args: argparse.Namespace, remat: bool) -> dict:
    import time

    import torch

    import gptfn
    import gptfn.optim as optim
    from gptfn.train import make_train_step

    torch.set_num_threads(2)
    cfg = gptfn.GPTConfig(256, args.seq, args.layers, args.width // 64, args.width)
    params = gptfn.init(cfg, seed=0)
    tx = optim.adamw(1e-3)
    state = tx.init(params)
    tokens = torch.randint(
        0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    step = make_train_step(tx, remat=remat)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    _, _, metrics = step(params, state, (tokens, tokens))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "remat": remat,
        "peak_step_mib": (peak - before) / 1024,
        "seconds": seconds,
        "loss": float(metrics["loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variant", choices=["remat", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args, args.variant == "remat")))
        return
    base = [
        sys.executable,
        __file__,
        "--layers",
        str(args.layers),
        "--width",
        str(args.width),
        "--seq",
        str(args.seq),
        "--batch",
        str(args.batch),
        "--variant",
    ]
    rows = [
        json.loads(
            subprocess.run([*base, v], capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        for v in ("plain", "remat")
    ]
    print(f"{args.layers} layers x {args.width} wide, batch {args.batch} x {args.seq} tokens, fp32")
    print("| variant | step peak memory (MiB above start) | step time (s) | loss |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {'remat' if r['remat'] else 'plain'} | {r['peak_step_mib']:.0f} "
            f"| {r['seconds']:.2f} | {r['loss']:.6f} |"
        )
    plain, remat = rows
    print(
        f"remat uses {remat['peak_step_mib'] / plain['peak_step_mib']:.2f}x the memory, "
        f"{remat['seconds'] / plain['seconds']:.2f}x the time; same loss: "
        f"{abs(plain['loss'] - remat['loss']) < 1e-6}"
    )


if __name__ == "__main__":
    main()
