"""Data parallelism with torchrun + gloo on loopback: the same trajectory at any world size.

Every process is bounded by a timeout and killed with its whole process group, also when the
test fails."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optree
import pytest

import gptfn
from gptfn.data import prepare, shakespeare

SMALL = {
    "--n-layer": "1",
    "--n-head": "2",
    "--n-embd": "32",
    "--block-size": "32",
    "--batch-size": "4",
    "--max-steps": "6",
    "--eval-interval": "3",
    "--eval-steps": "2",
    "--log-interval": "1",
    "--sample-tokens": "0",
    "--dist-timeout": "60",
}
LONG = {**SMALL, "--max-steps": "200", "--eval-interval": "20", "--log-interval": "10"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    (root / "plays.txt").write_text(shakespeare()[:30_000])
    prepare(root / "plays.txt", root / "char", "char")
    return root / "char"


def _train_args(data_dir: Path, out: Path, options: dict[str, str], *extra: str) -> list[str]:
    flat = [x for kv in options.items() for x in kv]
    return [
        "-m",
        "gptfn",
        "train",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--no-progress",
        *flat,
        *extra,
    ]


def _start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[str]:
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:  # torchrun and its workers share the process group
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return outputs


def _single(data_dir: Path, out: Path, options: dict[str, str], *extra: str) -> subprocess.Popen:
    return _start([sys.executable, *_train_args(data_dir, out, options, *extra)], out.parent)


def _ranks(
    data_dir: Path,
    out: Path,
    options: dict[str, str],
    *extra: str,
    launcher: tuple[str, ...] = ("--standalone", "--nproc-per-node", "2"),
) -> subprocess.Popen:
    return _start([*TORCHRUN, *launcher, *_train_args(data_dir, out, options, *extra)], out.parent)


def _params_close(a: Path, b: Path, tol: float) -> None:
    pa, pb = gptfn.load_run(a)[0], gptfn.load_run(b)[0]
    diff = max(
        float((x - y).abs().max()) for x, y in zip(optree.tree_leaves(pa), optree.tree_leaves(pb))
    )
    assert diff < tol, f"final params differ by {diff}"


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) == 6
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5
    _params_close(a, b, 1e-5)


def test_two_ranks_equal_one_rank_with_accumulation(data_dir, tmp_path):
    one = _single(data_dir, tmp_path / "one", SMALL, "--grad-accum", "2")
    two = _ranks(data_dir, tmp_path / "two", SMALL, "--grad-accum", "1")
    outputs = _finish([one, two])
    assert outputs[1].count("done: 6 steps") == 1  # rank 0 alone reports
    assert "(replicated)" in outputs[1]
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def test_two_nodes_rendezvous_on_loopback(data_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        _ranks(
            data_dir,
            tmp_path / "nodes",
            SMALL,
            "--grad-accum",
            "1",
            launcher=(
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "gptfn-test",
                "--node-rank",
                str(rank),
            ),
        )
        for rank in (0, 1)
    ]
    _finish(nodes)
    _finish([_single(data_dir, tmp_path / "one", SMALL, "--grad-accum", "2")])
    _assert_same_run(tmp_path / "one", tmp_path / "nodes")


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    log = run / "log.jsonl"
    while time.monotonic() < deadline:
        if log.is_file() and any(
            json.loads(line)["step"] >= step
            for line in log.read_text().splitlines()
            if line.strip()
        ):
            return
        if proc.poll() is not None:
            raise AssertionError("the run ended before it could be interrupted")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_sharded_run_resumes_at_another_world_size(data_dir, tmp_path):
    _finish([_single(data_dir, tmp_path / "ref", LONG, "--grad-accum", "2")])
    run = tmp_path / "run"
    two = _ranks(data_dir, run, LONG, "--grad-accum", "1", "--shard-optimizer")
    try:
        _wait_for_step(run, 20, two)
    finally:
        os.killpg(two.pid, signal.SIGKILL)  # the whole group, mid-run
        out, _ = two.communicate()
    line = next(x for x in out.splitlines() if x.startswith("optimizer state per rank (MiB)"))
    assert line.endswith("(sharded)")
    per_rank = [float(v) for v in line.split(":")[1].split("(")[0].split(",")]
    assert max(per_rank) < 0.6 * sum(per_rank)  # about 1/N of the full state each
    (log,) = _finish([_single(data_dir, run, LONG, "--grad-accum", "2", "--resume", "auto")])
    assert "resuming from" in log
    _params_close(tmp_path / "ref", run, 1e-6)


def test_restart_after_a_worker_is_killed(data_dir, tmp_path):
    _finish([_ranks(data_dir, tmp_path / "ref", LONG)])
    run = tmp_path / "run"
    proc = _ranks(
        data_dir,
        run,
        LONG,
        "--resume",
        "auto",
        launcher=("--standalone", "--nproc-per-node", "2", "--max-restarts", "1"),
    )
    try:
        _wait_for_step(run, 20, proc)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        os.kill(int(workers.stdout.split()[0]), signal.SIGKILL)  # torchrun restarts the group
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    (out,) = _finish([proc])
    assert "resuming from" in out
    _params_close(tmp_path / "ref", run, 1e-6)
