"""FSDP (``--fsdp``) with torchrun + gloo on loopback: the one-process trajectory on 2 and 4
ranks, DCP checkpoints that resume on another number of ranks, a 2-node run, a dead rank.

The built-in test corpus has a vocabulary of 59: its embedding rows shard unevenly on 4 ranks.
Every process is bounded by a timeout and killed with its whole process group."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import optree
import pytest
import torch
from test_distributed import SMALL, TORCHRUN, _finish, _single, _start, _train_args, _wait_for_step

import gptfn
from gptfn.checkpoint import load_checkpoint
from gptfn.data import prepare, shakespeare

TRAJ = {**SMALL, "--max-steps": "20", "--eval-interval": "10", "--warmup-steps": "2"}
LONG = {**TRAJ, "--max-steps": "60", "--eval-interval": "10", "--log-interval": "5"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    (root / "plays.txt").write_text(shakespeare()[:30_000])
    prepare(root / "plays.txt", root / "char", "char")
    return root / "char"


def _fsdp(data_dir: Path, out: Path, options: dict, n: int, *extra: str, launcher=()):
    launch = launcher or ("--standalone", "--nproc-per-node", str(n))
    args = _train_args(data_dir, out, options, "--fsdp", *extra)
    return _start([*TORCHRUN, *launch, *args], out.parent)


def _kill_9(launcher: subprocess.Popen) -> None:
    """``kill -9`` of torchrun and of its workers, mid-run (as a lost node). torchrun 2.13 puts
    each worker in its own process group, so killing the launcher's group alone leaves them
    training (measured: for ~30 s, writing the run's files)."""
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
    for pid in [launcher.pid, *map(int, workers.stdout.split())]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _same_trajectory(a: Path, b: Path, steps: int = 20, tol: float = 1e-5) -> None:
    ra, rb = _records(a), _records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, steps + 1))
    loss = max(abs(x["train_loss"] - y["train_loss"]) for x, y in zip(ra, rb))
    norm = max(abs(x["grad_norm"] - y["grad_norm"]) / y["grad_norm"] for x, y in zip(ra, rb))
    assert loss < tol, f"losses differ by {loss}"
    assert norm < tol, f"gradient norms differ by {norm} (relative)"


def _params_close(a: Path, b: Path, tol: float) -> None:
    pa, pb = gptfn.load_run(a)[0], gptfn.load_run(b)[0]
    diff = max(
        float((x - y).abs().max()) for x, y in zip(optree.tree_leaves(pa), optree.tree_leaves(pb))
    )
    assert diff < tol, f"final params differ by {diff}"


@pytest.mark.parametrize(
    "optimizer, ranks, mesh",
    [("adamw", 2, None), ("adamw", 4, None), ("muon", 2, None), ("muon", 4, "2x2")],
)
def test_fsdp_follows_the_one_process_trajectory(data_dir, tmp_path, optimizer, ranks, mesh):
    """Global batch 16 rows either way: 1 x 4 micro-batches against N ranks x 4/N."""
    opts = {**TRAJ, "--optimizer": optimizer}
    one = _single(data_dir, tmp_path / "one", opts, "--grad-accum", "4")
    extra = ("--grad-accum", str(4 // ranks), *(("--mesh", mesh) if mesh else ()))
    many = _fsdp(data_dir, tmp_path / "many", opts, ranks, *extra)
    outputs = _finish([one, many], timeout=300)
    assert "(fsdp)" in outputs[1] and outputs[1].count("done: 20 steps") == 1
    _same_trajectory(tmp_path / "one", tmp_path / "many")
    assert (tmp_path / "many" / "last.dcp" / "meta.json").is_file()
    _params_close(tmp_path / "one", tmp_path / "many", 1e-5)  # load_run reads the DCP folder


@pytest.mark.parametrize(
    "flags, tol",
    [(("--remat",), 1e-5), (("--dtype", "bfloat16"), 1e-3), (("--dtype", "float16"), 1e-3)],
)
def test_fsdp_with_remat_autocast_and_loss_scaling(data_dir, tmp_path, flags, tol):
    opts = {**SMALL, "--optimizer": "adamw", "--warmup-steps": "2"}
    one = _single(data_dir, tmp_path / "one", opts, "--grad-accum", "2", *flags)
    two = _fsdp(data_dir, tmp_path / "two", opts, 2, "--grad-accum", "1", *flags)
    _finish([one, two], timeout=300)
    _same_trajectory(tmp_path / "one", tmp_path / "two", steps=6, tol=tol)


OPTIMIZERS_ON_SHARDS = """
import optree, torch, torch.distributed as dist
import gptfn
from gptfn.distributed import make_mesh, shard, unshard
from gptfn.optim import adamw, chain, clip_by_global_norm, lion, masked, muon, sgd
dist.init_process_group("gloo")
mesh = make_mesh("cpu")
params = gptfn.init(gptfn.GPTConfig(59, 16, n_layer=1, n_head=2, n_embd=32), 0)
torch.manual_seed(0)
grads = optree.tree_map(torch.randn_like, params)
for tx in [
    adamw(1e-3), lion(1e-3), sgd(1e-2, momentum=0.9), muon(0.02),
    chain(clip_by_global_norm(0.5), masked(adamw(1e-3), lambda path, leaf: leaf.ndim > 1)),
]:
    state, sharded_state = tx.init(params), shard(tx.init(params), mesh)
    for _ in range(2):
        u, state = tx.update(grads, state, params)
        su, sharded_state = tx.update(shard(grads, mesh), sharded_state, shard(params, mesh))
    pairs = zip(optree.tree_leaves(unshard(su)), optree.tree_leaves(u))
    assert max(float((a - b).abs().max()) for a, b in pairs) < 1e-6
from gptfn.train.fsdp import make_sharded_train_step  # its clip reuses the logged norm
norms, foreach_norm = [], torch._foreach_norm
torch._foreach_norm = lambda xs, *a, **k: norms.append(1) or foreach_norm(xs, *a, **k)
tx = chain(clip_by_global_norm(0.5), adamw(1e-3))
step = make_sharded_train_step(tx)
sharded = shard(params, mesh)
tokens = torch.randint(0, 59, (1, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
_, _, metrics = step(sharded, shard(tx.init(params), mesh), (tokens, tokens))
torch._foreach_norm = foreach_norm
assert len(norms) == 1 and float(metrics["grad_norm"]) > 0, (len(norms), metrics)
print("optimizers ok")
"""


def test_optimizers_run_on_shards(tmp_path):
    """AdamW, Lion, SGD, Muon, clipping (a global norm over ranks) and masks on DTensor shards
    give the unsharded updates, with uneven shards (59 rows on 4 ranks)."""
    script = tmp_path / "optimizers.py"
    script.write_text(OPTIMIZERS_ON_SHARDS)
    proc = _start([*TORCHRUN, "--standalone", "--nproc-per-node", "4", str(script)], tmp_path)
    (out,) = _finish([proc], timeout=300)
    assert out.count("optimizers ok") == 4


def test_dcp_resumes_on_fewer_ranks_after_kill_9(data_dir, tmp_path):
    """4 ranks killed mid-run -> 2 ranks killed mid-run -> 1 process: the uninterrupted end."""
    _finish([_single(data_dir, tmp_path / "ref", LONG, "--grad-accum", "4")], timeout=300)
    run = tmp_path / "run"
    for ranks, until in ((4, 20), (2, 40)):
        proc = _fsdp(data_dir, run, LONG, ranks, "--grad-accum", str(4 // ranks), "--resume")
        try:
            _wait_for_step(run, until + 5, proc, timeout=240)
        finally:
            _kill_9(proc)
            out, _ = proc.communicate()
        if ranks == 2:
            assert "last.dcp at step 20" in out, out[-2000:]
    assert json.loads((run / "last.dcp" / "meta.json").read_text())["step"] >= 40
    single = _single(data_dir, run, LONG, "--grad-accum", "4", "--fsdp", "--resume")
    (log,) = _finish([single], timeout=300)
    assert "not launched by torchrun" in log and "resuming from" in log and "last.dcp" in log
    _params_close(tmp_path / "ref", run, 1e-5)
    ref_losses = {r["step"]: r["train_loss"] for r in _records(tmp_path / "ref")}
    assert all(abs(r["train_loss"] - ref_losses[r["step"]]) < 1e-5 for r in _records(run))


def test_resume_with_another_global_batch_is_refused(data_dir, tmp_path):
    _finish([_fsdp(data_dir, tmp_path / "run", TRAJ, 2, "--grad-accum", "1")], timeout=300)
    again = _single(data_dir, tmp_path / "run", TRAJ, "--grad-accum", "1", "--resume")
    out, _ = again.communicate(timeout=120)
    assert again.returncode != 0
    assert "global batch of 8 rows, this run has 4" in out


def test_export_consolidates_a_dcp_run(data_dir, tmp_path):
    _finish([_fsdp(data_dir, tmp_path / "run", TRAJ, 2)], timeout=300)
    out = tmp_path / "last.safetensors"
    meta = gptfn.checkpoint.consolidate(tmp_path / "run" / "last.dcp", out)
    params, _, saved = load_checkpoint(out)
    assert saved["step"] == meta["step"] == 20
    whole, _, _ = gptfn.checkpoint.read_dcp_checkpoint(tmp_path / "run" / "last.dcp")
    assert all(
        torch.equal(x, y) for x, y in zip(optree.tree_leaves(params), optree.tree_leaves(whole))
    )
    cmd = [sys.executable, "-m", "gptfn", "export", "--run", str(tmp_path / "run")]
    done = subprocess.run(
        [*cmd, "--safetensors", str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(tmp_path / "x.safetensors")[2]["step"] == 20
    sample = [sys.executable, "-m", "gptfn", "sample", "--run", str(tmp_path / "run")]
    done = subprocess.run([*sample, "--max-new-tokens", "8"], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_two_nodes_on_loopback_with_fsdp(data_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        _fsdp(
            data_dir,
            tmp_path / "nodes",
            TRAJ,
            1,
            "--grad-accum",
            "2",
            launcher=(
                *("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"),
                *("--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "gptfn-fsdp"),
                *("--node-rank", str(rank)),
            ),
        )
        for rank in (0, 1)
    ]
    one = _single(data_dir, tmp_path / "one", TRAJ, "--grad-accum", "4")
    _finish([*nodes, one], timeout=300)
    _same_trajectory(tmp_path / "one", tmp_path / "nodes")


def test_a_dead_rank_ends_the_run_with_an_error(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = _fsdp(data_dir, run, {**LONG, "--max-steps": "400"}, 2)
    try:
        _wait_for_step(run, 5, proc, timeout=120)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        os.kill(int(workers.stdout.split()[0]), signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)  # no hang: torchrun ends the other rank
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0 and "done:" not in out
