"""The heap kept for the next step (gptfn.train.host_memory): freed blocks are reused instead of
faulted back in, and the loop sets the policy on a CPU unless told not to."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import gptfn.train.loop as loop
from gptfn.train import TrainConfig, keep_freed_memory, train
from gptfn.train.host_memory import _glibc

glibc_only = pytest.mark.skipif(_glibc() is None, reason="the policy is glibc's (Linux)")

CYCLES = """
import resource, sys, torch
from gptfn.train import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def cycle():  # a step's worth of activations, allocated, touched and freed
    blocks = [torch.ones(2**21) for _ in range(10)]  # 10 x 8 MB
    del blocks
for _ in range(3):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(way: str, seed: int) -> int:
    """Page faults of five alloc-touch-free cycles in a fresh process (the policy is global).
    Whether glibc trims depends on what else sits at the heap's top, which moves with Python's
    hash seed: fixed here, so each run is repeatable."""
    done = subprocess.run(
        [sys.executable, "-c", CYCLES, way],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": str(seed)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@glibc_only
def test_a_kept_heap_reuses_freed_blocks_where_glibc_gives_them_back():
    pages = 5 * 10 * 8 * 2**20 // 4096  # every page of every cycle
    given_back = [_faults("default", seed) for seed in (0, 1)]
    kept = [_faults("keep", seed) for seed in (0, 1)]
    # glibc trims what lies free at the heap's top beyond twice its mmap threshold (<= 32 MB)
    assert max(given_back) > pages // 2
    assert max(kept) < pages // 100


def test_keep_freed_memory_says_whether_it_took(monkeypatch):
    import gptfn.train.host_memory as host_memory

    monkeypatch.setattr(host_memory, "_glibc", lambda: None)  # macOS, musl
    assert keep_freed_memory() is False
    assert host_memory.release_freed_memory() is False


@pytest.mark.parametrize("keep", [True, False])
def test_the_loop_keeps_the_heap_on_a_cpu_and_gives_it_back_at_the_end(
    data_dir, tmp_path, monkeypatch, keep
):
    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(loop, "release_freed_memory", lambda: calls.append("release") or True)

    def step_seen(record: dict) -> None:
        calls.append("step")

    options = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_steps=2)
    options |= dict(log_interval=1, eval_steps=1, warmup_steps=1, progress=False, sample_tokens=0)
    cfg = TrainConfig.from_dict(
        options | dict(data=str(data_dir), out=str(tmp_path / "run"), keep_memory=keep)
    )
    train(cfg, callbacks=[step_seen])
    assert calls == (["keep", "step", "step", "release"] if keep else ["step", "step"])
