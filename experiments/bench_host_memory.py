"""``gptfn train`` on a CPU with the heap kept (the default) against ``--no-keep-memory``.

    python experiments/bench_host_memory.py [--steps 80] [--rounds 5] [--threads 2]

Each round trains the default recipe once each way, in fresh processes, the order flipped
from round to round; prints the median tokens/s of the logged steps from step 20 on (the
warm-up excluded), the ratio, in how many rounds the kept heap was faster, and each run's
minor page faults (the whole process: start-up, data and the final evaluation included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gptfn.data import prepare, shakespeare

WAYS = {"kept": [], "given back": ["--no-keep-memory"]}


def run(flags: list[str], data: Path, out: Path, steps: int, threads: int) -> tuple[float, int]:
    """(median tokens/s from step 20, the process's minor page faults) of one run."""
    cmd = [
        *(sys.executable, "-m", "gptfn", "train", "--data", str(data), "--out", str(out)),
        *("--max-steps", str(steps), "--eval-interval", str(steps), "--log-interval", "10"),
        *("--no-progress", "--sample-tokens", "0", "--overwrite", *flags),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if r["step"] >= 20 and "tokens_per_s" in r]
    return statistics.median(speeds), faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"{args.rounds} rounds of {args.steps} steps, {args.threads} threads, speedrun recipe")
    print("| dtype | kept tok/s | given back tok/s | kept / given back | kept faster "
          "| page faults a run, kept / given back |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "plays.txt").write_text(shakespeare())
        data, out = root / "char", root / "run"
        prepare(root / "plays.txt", data, "char")
        for dtype in ("float32", "bfloat16"):
            got: dict[str, list[tuple[float, int]]] = {way: [] for way in WAYS}
            for i in range(args.rounds):
                for way in list(WAYS)[:: 1 if i % 2 == 0 else -1]:
                    flags = [*WAYS[way], "--dtype", dtype]
                    got[way].append(run(flags, data, out, args.steps, args.threads))
            _row(dtype, got)


def _row(dtype: str, got: dict[str, list[tuple[float, int]]]) -> None:
    kept, back = ([speed for speed, _ in got[way]] for way in WAYS)
    faults = {way: statistics.median(f for _, f in got[way]) for way in WAYS}
    wins = sum(k > b for k, b in zip(kept, back))
    print(
        f"| {dtype} | {statistics.median(kept):,.0f} | {statistics.median(back):,.0f} "
        f"| {statistics.median(kept) / statistics.median(back):.3f} | {wins} of {len(kept)} "
        f"| {faults['kept']:,.0f} / {faults['given back']:,.0f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
