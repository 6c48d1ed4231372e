"""The log tells the truth: each optimizer part's learning rate as applied, and plain lines
(no progress-bar redraws) when the output is not a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gptfn.train import OptimizerConfig, learning_rates
from gptfn.train.log import applied_updates, format_record

TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
    "--batch-size", "4", "--eval-steps", "2", "--log-interval", "1", "--sample-tokens", "0",
]  # fmt: skip


def test_muon_run_logs_both_learning_rates_as_applied_and_plain_lines_in_a_file(data_dir, tmp_path):
    run = tmp_path / "run"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        command = [sys.executable, "-m", "gptfn", "train", "--data", str(data_dir), "--out",
                   str(run), *TINY, "--optimizer", "muon", "--muon-lr", "0.05", "--lr", "0.004",
                   "--warmup-steps", "3", "--max-steps", "6", "--eval-interval", "6"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # progress on (the default), into files
        done = subprocess.run(command, stdout=out, stderr=err, env=env)
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert done.returncode == 0, stderr
    assert "\r" not in stdout + stderr, "progress-bar redraws in a log file"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    cfg = OptimizerConfig(optimizer="muon", muon_lr=0.05, lr=0.004, warmup_steps=3)
    rates = learning_rates(cfg, total_steps=6)
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        for name in ("lr", "muon_lr"):
            assert r[name] == pytest.approx(float(rates[name](torch.tensor(r["step"] - 1))))
        assert f"step {r['step']}/6: loss {r['train_loss']:.4f}" in stdout
    assert records[1]["muon_lr"] == pytest.approx(0.05 / 3 * 1) and records[1]["lr"] < 0.004
    assert f"muon_lr {records[2]['muon_lr']:.2e}" in stdout


def test_applied_updates_reads_the_optimizers_own_count():
    state = ({"count": torch.tensor(5)}, {"inner": {"count": torch.tensor(5), "mu": {}}})
    assert applied_updates(state, default=9) == 5  # e.g. four float16 overflows skipped
    assert applied_updates({"momentum": {"w": torch.zeros(2)}}, default=9) == 9  # no count
    line = format_record(
        {"step": 3, "train_loss": 2.5, "lr": 1e-3, "muon_lr": 2e-2, "tokens_per_s": 1000.0}, 10
    )
    assert line == "step 3/10: loss 2.5000, lr 1.00e-03, muon_lr 2.00e-02, 1,000 tokens/s"
