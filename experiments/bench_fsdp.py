"""Throughput of ``--fsdp`` against data parallel (and ZeRO-1) at 2 ranks, CPU + gloo.

    python experiments/bench_fsdp.py [--steps 40] [--ranks 2]

Each mode trains the same model on the same global batch with ``gptfn train`` under torchrun
(1 thread per rank) and reports the median tokens/s of the logged steps after the first
quarter (warm-up excluded), and the optimizer-state MiB per rank the run printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gptfn.data import prepare, shakespeare

MODEL = [
    *("--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64"),
    *("--batch-size", "8", "--optimizer", "adamw", "--warmup-steps", "2"),
    *("--eval-steps", "1", "--sample-tokens", "0", "--no-progress", "--log-interval", "1"),
]
MODES = {"data parallel": [], "ZeRO-1": ["--shard-optimizer"], "FSDP": ["--fsdp"]}


def run(mode: list[str], data: Path, out: Path, steps: int, ranks: int) -> tuple[float, str]:
    """(median tokens/s, the optimizer-state line) of one run."""
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *("--nproc-per-node", str(ranks), "-m", "gptfn", "train", "--data", str(data)),
        *("--out", str(out), "--max-steps", str(steps), "--eval-interval", str(steps)),
        *MODEL,
        *mode,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records[len(records) // 4 :]]
    state = next(x for x in done.stdout.splitlines() if x.startswith("optimizer state"))
    return statistics.median(speeds), state.split(":", 1)[1].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "plays.txt").write_text(shakespeare()[:200_000])
        prepare(root / "plays.txt", root / "char", "char")
        rows = {
            name: run(flags, root / "char", root / name.replace(" ", "_"), args.steps, args.ranks)
            for name, flags in MODES.items()
        }
    base = rows["data parallel"][0]
    print(f"| mode ({args.ranks} ranks) | tokens/s | vs data parallel | optimizer state MiB |")
    print("|---|---|---|---|")
    for name, (speed, state) in rows.items():
        print(f"| {name} | {speed:,.0f} | {speed / base:.2f}x | {state} |")


if __name__ == "__main__":
    main()
