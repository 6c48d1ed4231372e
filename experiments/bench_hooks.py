"""Does the activation-hook plumbing slow ``forward`` down when nothing is captured?

Times today's ``gptfn.forward`` against the ``gptfn/model.py`` of a git revision from before the
hooks existed (loaded from ``git show``), alternating them in one loop, plus the cost of
capturing everything with ``run_with_cache``.

    python experiments/bench_hooks.py [--before daec843] [--repeats 30]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gptfn
from gptfn.research.interp import run_with_cache


def load_model_at(rev: str):
    source = subprocess.run(
        ["git", "show", f"{rev}:gptfn/model.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "model_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("model_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_before"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="daec843")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    gptfn.set_runtime_checks(False)
    before = load_model_at(args.before)
    print(
        f"forward, no grad, median ms of {args.repeats}; 'before' = gptfn/model.py at {args.before}"
    )
    print("| model | tokens | before | now | now / before | run_with_cache (all names) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for n_layer, width, batch, seq in ((4, 128, 32, 128), (12, 768, 1, 64)):
        params = gptfn.init(gptfn.GPTConfig(75, max(seq, 128), n_layer, 4, width), seed=0)
        toks = torch.randint(0, 75, (batch, seq))
        times = {"before": [], "now": [], "cache": []}
        with torch.no_grad():
            for r in range(args.repeats + 3):
                for name, fn in (
                    ("before", lambda: before.forward(params, toks)),
                    ("now", lambda: gptfn.forward(params, toks)),
                    ("cache", lambda: run_with_cache(params, toks)),
                ):
                    t0 = time.perf_counter()
                    fn()
                    if r >= 3:
                        times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(
            f"| {n_layer} x {width} | {batch} x {seq} | {med['before']:.2f} | {med['now']:.2f} | "
            f"{med['now'] / med['before']:.3f} | {med['cache']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
