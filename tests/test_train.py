"""The pure step and the loop: accumulation, remat, compile, precision, resume, checkpoints, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import optree
import pytest
import torch
from conftest import random_tokens

import gptfn
import gptfn.optim as optim
from gptfn.checkpoint import load_checkpoint, load_run, save_checkpoint
from gptfn.cli import main
from gptfn.data import prepare, shakespeare
from gptfn.testing import assert_compile_matches_eager
from gptfn.train import TrainConfig, loss_scaling, make_train_step, train

TINY = dict(
    n_layer=1,
    n_head=2,
    n_embd=16,
    block_size=16,
    batch_size=4,
    eval_interval=3,
    eval_steps=2,
    log_interval=1,
    warmup_steps=2,
    progress=False,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "plays.txt").write_text(shakespeare()[:20_000])
    prepare(root / "plays.txt", root / "char", "char")
    return root / "char"


def _leaves_equal(a, b) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True)
    )


def _max_diff(a, b) -> float:
    return max(
        float((x - y).abs().max()) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b))
    )


def test_gradient_accumulation_equals_one_big_batch(params, cfg):
    tokens, targets = (
        random_tokens(cfg.vocab_size, 8, 16, 1),
        random_tokens(cfg.vocab_size, 8, 16, 2),
    )
    tx = optim.adamw(1e-3)
    big = make_train_step(tx)(params, tx.init(params), (tokens, targets))
    small = make_train_step(tx, accum_steps=4)(params, tx.init(params), (tokens, targets))
    assert _max_diff(big[0], small[0]) < 1e-6
    torch.testing.assert_close(big[2]["loss"], small[2]["loss"], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="equal micro-batches"):
        make_train_step(tx, accum_steps=3)(params, tx.init(params), (tokens, targets))


def test_remat_gives_the_same_gradients(params, cfg):
    tokens = random_tokens(cfg.vocab_size, 4, 16, 3)

    def grads(remat: bool):
        torch.manual_seed(0)  # dropout draws must be replayed identically by the recompute
        return torch.func.grad(gptfn.loss)(params, tokens, tokens, dropout=0.2, remat=remat)

    plain, remat = grads(False), grads(True)
    assert _max_diff(plain, remat) < 1e-6
    torch.manual_seed(1)
    assert _max_diff(plain, torch.func.grad(gptfn.loss)(params, tokens, tokens, dropout=0.2)) > 1e-4


def test_compiled_step_matches_eager():
    params = gptfn.init(gptfn.GPTConfig(31, 16, 1, 2, 16), seed=0)
    tx = optim.adamw(1e-2)
    step = make_train_step(tx)
    batch = (random_tokens(31, 4, 16, 0), random_tokens(31, 4, 16, 1))

    def three_steps(params, state, batch):
        losses = []
        for _ in range(3):
            params, state, metrics = step(params, state, batch)
            losses.append(metrics["loss"])
        # compare functions, not raw params: the key bias has a true gradient of zero, so Adam
        # turns float noise there into lr-sized steps that do not change the output
        return torch.stack(losses), gptfn.forward(params, batch[0])

    assert_compile_matches_eager(three_steps, params, tx.init(params), batch)


def test_bf16_loss_is_close_to_fp32(params, cfg):
    tx = optim.adamw(1e-3)
    batch = (random_tokens(cfg.vocab_size, 4, 16, 4), random_tokens(cfg.vocab_size, 4, 16, 5))
    _, _, fp32 = make_train_step(tx)(params, tx.init(params), batch)
    _, _, bf16 = make_train_step(tx, dtype="bfloat16")(params, tx.init(params), batch)
    assert fp32["loss"] != bf16["loss"]  # autocast really ran in bf16
    assert abs(float(fp32["loss"] - bf16["loss"])) < 0.02 * float(fp32["loss"])


def test_float16_loss_scaling_skips_nonfinite_steps(params, cfg):
    tx = loss_scaling(optim.adamw(1e-3), init_scale=2.0**10)
    state = tx.init(params)
    bad = optree.tree_map(lambda x: torch.full_like(x, float("inf")), params)
    updates, new_state = tx.update(bad, state, params)
    assert all(float(u.abs().max()) == 0 for u in optree.tree_leaves(updates))
    assert float(new_state["loss_scale"]) == 2.0**9
    assert _leaves_equal(new_state["inner"], state["inner"])
    step = make_train_step(tx, dtype="float16")
    batch = (random_tokens(cfg.vocab_size, 4, 16, 4), random_tokens(cfg.vocab_size, 4, 16, 5))
    new_params, _, metrics = step(params, state, batch)
    assert torch.isfinite(metrics["loss"]) and not _leaves_equal(new_params, params)
    with pytest.raises(ValueError, match="loss_scaling"):
        make_train_step(optim.adamw(1e-3), dtype="float16")(
            params, optim.adamw(1e-3).init(params), batch
        )


def test_resume_is_bitwise_exact(data_dir, tmp_path):
    common = dict(TINY, data=str(data_dir), max_steps=8, dropout=0.1, eval_interval=2)
    train(TrainConfig(out=str(tmp_path / "straight"), **common))

    def crash(record: dict) -> None:
        if record["step"] == 4:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "resumed"), **common), callbacks=[crash])
    assert load_checkpoint(tmp_path / "resumed" / "last.safetensors")[2]["step"] == 4
    train(TrainConfig(out=str(tmp_path / "resumed"), resume=True, **common))
    straight, _, meta = load_run(tmp_path / "straight")
    resumed, _, meta2 = load_run(tmp_path / "resumed")
    assert meta["step"] == meta2["step"] == 8
    assert _leaves_equal(straight, resumed)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    cfg = TrainConfig(
        out=str(tmp_path),
        data=str(data_dir),
        max_steps=200,
        lr=1e12,
        grad_clip=0.0,
        optimizer="sgd",
        **{**TINY, "warmup_steps": 0},
    )
    with pytest.raises(FloatingPointError, match="non-finite loss") as info:
        train(cfg)
    if (tmp_path / "last.safetensors").is_file():
        params, _, _ = load_run(tmp_path)
        assert all(torch.isfinite(x).all() for x in optree.tree_leaves(params))
        assert "last.safetensors" in str(info.value)


def test_checkpoint_errors(tmp_path, params):
    tx = optim.adamw(1e-3)
    save_checkpoint(tmp_path / "c.safetensors", params, tx.init(params), {"step": 1})
    loaded, _, meta = load_checkpoint(tmp_path / "c.safetensors", tx.init(params))
    assert meta == {"step": 1} and _leaves_equal(loaded, params)
    with pytest.raises(ValueError, match="does not match this optimizer"):
        load_checkpoint(tmp_path / "c.safetensors", optim.lion(1e-3).init(params))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00garbage-not-a-header")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.safetensors")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_cli_end_to_end(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "train.toml"
    config.write_text("max-steps = 6\nn_embd = 16\nlr = 0.01\n")
    flags = [
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--block-size",
        "16",
        "--batch-size",
        "4",
        "--eval-interval",
        "3",
        "--eval-steps",
        "2",
        "--no-progress",
        "--sample-tokens",
        "20",
    ]
    assert (
        main(
            [
                "train",
                "--data",
                str(data_dir),
                "--out",
                str(run),
                "--config",
                str(config),
                "--grad-accum",
                "2",
                *flags,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "done: 6 steps" in out
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and "val_perplexity" in records[-1]
    assert (
        main(
            [
                "sample",
                "--run",
                str(run),
                "--prompt",
                "ROMEO:",
                "--max-new-tokens",
                "10",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(["eval", "--run", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["perplexity"] == pytest.approx(2.718281828 ** report["mean_nll"])
    assert main(["plot", str(run)]) == 0 and (run / "curves.png").stat().st_size > 1000
    assert main(["sample", "--run", str(tmp_path / "nope")]) == 1
    assert "no run directory" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "gptfn", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert all(cmd in out for cmd in ("prepare", "train", "sample", "eval", "plot"))
