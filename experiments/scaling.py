"""Data-parallel scaling on this machine: 1 process x 2 threads vs 2 processes x 1 thread.

Trains the same global batch both ways (``gptfn train --grad-accum 2`` vs ``torchrun
--nproc-per-node 2 ... --grad-accum 1``) and reads tokens/s from the logs; then, inside a
2-process torchrun, times ``all_reduce_mean`` on a gradient-sized tree to give the
communication share of the step.

    python experiments/scaling.py [--steps 60] [--n-embd 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gptfn
from gptfn.data import prepare, shakespeare


def run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(
        cmd,
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


def tokens_per_s(run_dir: Path, skip: int) -> float:
    records = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records[skip:])


def comm_worker(args: argparse.Namespace) -> None:
    from gptfn.distributed import all_reduce_mean, setup, teardown

    setup()
    params = gptfn.init(gptfn.GPTConfig(75, args.block_size, args.n_layer, 4, args.n_embd))
    grads = gptfn.tree.zeros_like(params)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        all_reduce_mean(grads)
        times.append(time.perf_counter() - t0)
    if int(os.environ["RANK"]) == 0:
        print(
            json.dumps(
                {
                    "all_reduce_ms": statistics.median(times[5:]) * 1e3,
                    "bytes": sum(x.numel() * 4 for x in gptfn.tree.leaves(grads)),
                }
            )
        )
    teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per rank and micro-batch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        comm_worker(args)
        return
    root = Path(tempfile.mkdtemp())
    (root / "plays.txt").write_text(shakespeare()[:1_000_000])
    prepare(root / "plays.txt", root / "data", "char")
    model = [
        "--n-layer",
        str(args.n_layer),
        "--n-embd",
        str(args.n_embd),
        "--block-size",
        str(args.block_size),
    ]
    common = [
        "-m",
        "gptfn",
        "train",
        "--data",
        str(root / "data"),
        *model,
        "--batch-size",
        str(args.batch_size),
        "--max-steps",
        str(args.steps),
        "--eval-interval",
        str(args.steps),
        "--eval-steps",
        "1",
        "--log-interval",
        "5",
        "--no-progress",
        "--sample-tokens",
        "0",
    ]
    run([sys.executable, *common, "--out", str(root / "one"), "--grad-accum", "2"])
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            *common,
            "--out",
            str(root / "two"),
            "--grad-accum",
            "1",
        ]
    )
    one, two = tokens_per_s(root / "one", 2), tokens_per_s(root / "two", 2)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            __file__,
            "--worker",
            *model,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    comm = json.loads(out.strip().splitlines()[-1])
    step_ms = 2 * args.batch_size * args.block_size / two * 1e3
    print(
        f"torch {torch.__version__}; {args.n_layer}x{args.n_embd}, global batch "
        f"{2 * args.batch_size} x {args.block_size} tokens, {args.steps} steps, median"
    )
    print("| layout | tokens/s | step (ms) |\n| --- | ---: | ---: |")
    print(
        f"| 1 process x 2 threads (grad-accum 2) | {one:.0f} | "
        f"{2 * args.batch_size * args.block_size / one * 1e3:.0f} |"
    )
    print(f"| 2 processes x 1 thread (torchrun, gloo) | {two:.0f} | {step_ms:.0f} |")
    print(
        f"\n2 processes / 1 process: {two / one:.2f}x tokens/s. Gradient all-reduce of "
        f"{comm['bytes'] / 2**20:.1f} MiB: {comm['all_reduce_ms']:.1f} ms = "
        f"{comm['all_reduce_ms'] / step_ms * 100:.1f}% of the 2-process step."
    )


if __name__ == "__main__":
    main()
