"""The pure step and the loop: accumulation, remat, precision, resume, checkpoints, the
optimizer a run asks for. The command line is tested in test_cli*.py."""

from __future__ import annotations

import functools

import optree
import pytest
import torch
from conftest import random_tokens

import gptfn
import gptfn.optim as optim
import gptfn.train.optimizer_options as train_options
from gptfn.checkpoint import load_checkpoint, load_run, save_checkpoint
from gptfn.data import prepare, shakespeare
from gptfn.model.layers import dense
from gptfn.train import TrainConfig, loss_scaling, make_train_step, train
from gptfn.train.step import _grads_and_loss

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


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optim.adamw(1e-2),
        lambda: optim.sgd(1e-2, 0.9),
        lambda: train_options.make_optimizer(train_options.OptimizerConfig(grad_clip=1e-3), 10),
    ],
)
def test_a_donated_step_updates_in_place_with_the_same_numbers(params, cfg, fused, make_tx):
    tokens = random_tokens(cfg.vocab_size, 4, 16, 5)
    tx, previous = make_tx(), optim.set_foreach(fused)
    try:
        copy = optree.tree_map(torch.clone, params)
        want = make_train_step(tx)(params, tx.init(params), (tokens, tokens))
        want = make_train_step(tx)(want[0], want[1], (tokens, tokens))
        state = tx.init(copy)
        got = make_train_step(tx, donate=True)(copy, state, (tokens, tokens))
        got = make_train_step(tx, donate=True)(got[0], got[1], (tokens, tokens))
    finally:
        optim.set_foreach(previous)
    assert _leaves_equal(want[0], got[0]) and _leaves_equal(want[1], got[1])
    assert not _leaves_equal(params, copy)  # the donated params were spent ...
    pointers = [(a.data_ptr(), b.data_ptr()) for a, b in zip(_leaves(copy), _leaves(got[0]))]
    assert all(a == b for a, b in pointers)  # ... updated where they lay
    moments = {x.data_ptr() for x in _leaves(state) if x.ndim > 0}
    assert moments <= {x.data_ptr() for x in _leaves(got[1])}  # the moments too


def _leaves(tree) -> list[torch.Tensor]:
    return optree.tree_leaves(tree)


def test_remat_gives_the_same_gradients(params, cfg):
    tokens = random_tokens(cfg.vocab_size, 4, 16, 3)

    def grads(remat: bool):
        torch.manual_seed(0)  # dropout draws must be replayed identically by the recompute
        return torch.func.grad(gptfn.loss)(params, tokens, tokens, dropout=0.2, remat=remat)

    plain, remat = grads(False), grads(True)
    assert _max_diff(plain, remat) < 1e-6
    torch.manual_seed(1)
    assert _max_diff(plain, torch.func.grad(gptfn.loss)(params, tokens, tokens, dropout=0.2)) > 1e-4


def test_bf16_loss_is_close_to_fp32(params, cfg):
    tx = optim.adamw(1e-3)
    batch = (random_tokens(cfg.vocab_size, 4, 16, 4), random_tokens(cfg.vocab_size, 4, 16, 5))
    _, _, fp32 = make_train_step(tx)(params, tx.init(params), batch)
    _, _, bf16 = make_train_step(tx, dtype="bfloat16")(params, tx.init(params), batch)
    assert fp32["loss"] != bf16["loss"]  # autocast really ran in bf16
    assert abs(float(fp32["loss"] - bf16["loss"])) < 0.02 * float(fp32["loss"])


def _stored_out_in(params):
    """The tree with each q/k/v weight a transposed view of an [out, in] tensor, the layout
    ``load_pretrained`` gives Hugging Face weights."""
    for block in params["blocks"]:
        for n in "qkv":
            w = block["attn"][f"w_{n}"]
            block["attn"][f"w_{n}"] = w.reshape(w.shape[0], -1).T.contiguous().T.view(w.shape)
    return params


@pytest.mark.parametrize("out_in", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_autocast_fuses_the_qkv_projections_with_the_same_gradients(bias, out_in):
    """Under autocast with grad, attention_qkv runs one matmul over the concatenated q/k/v
    weights (grouped-query here); the loss and gradients agree with the three separate
    projections, and the train step hands the optimizer gradients in their leaves' layout
    (contiguous, or the transposed layout of loaded weights), which its fused kernels need."""
    import gptfn.model.attention as attention

    cfg = gptfn.GPTConfig(64, 16, 2, 4, 32, n_kv_head=2, bias=bias)
    params = gptfn.init(cfg, seed=0)
    params = _stored_out_in(params) if out_in else params
    batch = (random_tokens(64, 3, 16, 1), random_tokens(64, 3, 16, 2))
    grad_fn = functools.partial(_grads_and_loss, gptfn.loss, torch.bfloat16, {})
    fused, fused_loss = grad_fn(params, *batch, None)
    separate = attention.attention_qkv
    with pytest.MonkeyPatch.context() as mp:  # the three projections one by one
        mp.setattr(attention, "attention_qkv", lambda p, x: tuple(
            dense(x, p[f"w_{n}"], p.get(f"b_{n}")) for n in "qkv"
        ))  # fmt: skip
        plain, plain_loss = grad_fn(params, *batch, None)
    assert attention.attention_qkv is separate
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-3, atol=0)
    for (path, a), b, x in zip(
        gptfn.tree.flatten(fused).items(), optree.tree_leaves(plain), optree.tree_leaves(params)
    ):
        assert a.stride() == x.stride(), path
        if not path.endswith("b_k"):  # a key bias's true gradient is 0 (softmax ignores it)
            assert float((a - b).abs().max()) < 0.02 * float(b.abs().max()), path
    leaves = [x.detach().requires_grad_() for x in optree.tree_leaves(params)]
    tree = optree.tree_unflatten(optree.tree_structure(params), leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = gptfn.loss(tree, *batch)
    w_q = torch.autograd.grad(loss, tree["blocks"][0]["attn"]["w_q"])[0]
    assert w_q.untyped_storage().nbytes() > w_q.numel() * 4  # a slice: the fused matmul ran


def test_float16_loss_scaling_skips_nonfinite_steps(params, cfg):
    tx = loss_scaling(optim.adamw(1e-3), init_scale=2.0**10)
    state = tx.init(params)
    bad = optree.tree_map(lambda x: torch.full_like(x, float("inf")), params)
    updates, new_state = tx.update(bad, state, params)
    assert all(float(u.abs().max()) == 0 for u in optree.tree_leaves(updates))
    assert float(new_state["loss_scale"]) == 2.0**9
    assert _leaves_equal(new_state["inner"], state["inner"])
    kept = optree.tree_map(torch.clone, state["inner"])
    with optim.donated():  # donating does not let the skipped step touch the moments
        _, new_state = tx.update(bad, state, optree.tree_map(torch.clone, params))
    assert _leaves_equal(new_state["inner"], kept) and _leaves_equal(state["inner"], kept)
    step = make_train_step(tx, dtype="float16")
    batch = (random_tokens(cfg.vocab_size, 4, 16, 4), random_tokens(cfg.vocab_size, 4, 16, 5))
    new_params, _, metrics = step(params, state, batch)
    assert torch.isfinite(metrics["loss"]) and not _leaves_equal(new_params, params)
    with pytest.raises(ValueError, match="loss_scaling"):
        make_train_step(optim.adamw(1e-3), dtype="float16")(
            params, optim.adamw(1e-3).init(params), batch
        )


def tiny(**options) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **options})


def test_resume_is_bitwise_exact(data_dir, tmp_path):
    common = dict(TINY, data=str(data_dir), max_steps=8, dropout=0.1, eval_interval=2)
    train(tiny(out=str(tmp_path / "straight"), **common))

    def crash(record: dict) -> None:
        if record["step"] == 4:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train(tiny(out=str(tmp_path / "resumed"), **common), callbacks=[crash])
    assert load_checkpoint(tmp_path / "resumed" / "last.safetensors")[2]["step"] == 4
    train(tiny(out=str(tmp_path / "resumed"), resume=True, **common))
    straight, _, meta = load_run(tmp_path / "straight")
    resumed, _, meta2 = load_run(tmp_path / "resumed")
    assert meta["step"] == meta2["step"] == 8
    assert _leaves_equal(straight, resumed)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    cfg = tiny(
        out=str(tmp_path),
        data=str(data_dir),
        max_steps=200,
        lr=1e12,
        grad_clip=0.0,
        optimizer="sgd",
        warmup_steps=0,
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


def test_resume_compares_model_and_data_before_the_optimizer_state(data_dir, tmp_path):
    common = dict(data=str(data_dir), out=str(tmp_path / "run"), max_steps=2)
    train(tiny(**common))
    with pytest.raises(ValueError, match=r"another model \(.*n_embd 16 there, 32 here"):
        train(tiny(**common, n_embd=32, resume=True))
    with pytest.raises(ValueError, match=r"trained with --recipe speedrun, .* add --recipe speed"):
        train(tiny(**common, recipe="gpt2", resume=True))
    with pytest.raises(
        ValueError, match=r"with --muon-momentum-warmup 300, this run asks for --muon-mo"
    ):
        train(tiny(**common, muon_momentum_warmup=0, resume=True))
    other = tmp_path / "other"
    (other / "t.txt").parent.mkdir()
    (other / "t.txt").write_text(shakespeare()[20_000:40_000].upper())
    prepare(other / "t.txt", other / "char")
    with pytest.raises(ValueError, match=r"cannot resume: .* another tokenizer"):
        train(tiny(**{**common, "data": str(other / "char")}, resume=True))


def test_next_start_removes_stale_temp_files_and_only_those(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny(data=str(data_dir), out=str(run), max_steps=2))
    stale = [run / ".last.safetensors.k3j_x9a2.tmp", run / ".best.safetensors.0a1b2c3d.tmp"]
    stale[0].mkdir()
    (stale[0] / ".tmpAbC123").write_bytes(b"half a checkpoint")  # what safetensors writes first
    stale[1].write_bytes(b"an old-style temp file")
    keep = [run / ".notes.tmp", run / "last.safetensors.tmp", run / ".last.safetensors.tmp"]
    for path in keep:
        path.write_text("not gptfn's")
    train(tiny(data=str(data_dir), out=str(run), max_steps=3, resume=True))
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


@pytest.mark.parametrize("before", ["as found", "ignored"])  # "ignored": as under nohup
def test_a_second_signal_stops_at_once(before):
    import os
    import signal
    import time

    from gptfn.train.interrupt import StopSignal, TrainingInterrupted

    found = signal.getsignal(signal.SIGINT)
    if before == "ignored":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs in the main thread between bytecodes
            assert stop.signum == signal.SIGINT  # the first one only asks the loop to stop
            with pytest.raises(TrainingInterrupted) as info:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
        assert info.value.signum == signal.SIGTERM and info.value.checkpoint is None
        # restored to what was there before, whatever it was (Python's default, or SIG_IGN
        # when the suite runs under nohup)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous
    finally:
        signal.signal(signal.SIGINT, found)


def _hidden_and_embedding_updates(**options) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = train_options.OptimizerConfig(warmup_steps=0, grad_clip=0.0, **options)
    tx = train_options.make_optimizer(cfg, total_steps=10)
    params = {"wte": torch.ones(5, 4), "blocks": {"w": torch.ones(4, 3)}}
    grads = {"wte": torch.full((5, 4), 0.5), "blocks": {"w": torch.arange(12.0).reshape(4, 3)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates["blocks"]["w"], updates["wte"]


def test_muon_has_its_own_learning_rate_and_sgd_its_own_momentum():
    w1, e1 = _hidden_and_embedding_updates(optimizer="muon", muon_lr=0.02)
    w2, e2 = _hidden_and_embedding_updates(optimizer="muon", muon_lr=0.04)
    torch.testing.assert_close(w2, 2 * w1)  # muon_lr scales the Muon part ...
    assert torch.equal(e1, e2)  # ... and not the AdamW part, which follows lr
    _, e3 = _hidden_and_embedding_updates(optimizer="muon", muon_lr=0.02, lr=4e-3, min_lr=0)
    torch.testing.assert_close(e3, 2 * e1)

    def sgd_twice(**options):
        tx = train_options.make_optimizer(
            train_options.OptimizerConfig("sgd", warmup_steps=0, **options), 10
        )
        params, state = {"w": torch.zeros(3)}, None
        state = tx.init(params)
        for g in (torch.ones(3), torch.ones(3)):
            updates, state = tx.update({"w": g}, state, params)
        return updates["w"]

    assert not torch.equal(sgd_twice(momentum=0.0), sgd_twice(momentum=0.9))
    assert torch.equal(sgd_twice(momentum=0.5, beta1=0.1), sgd_twice(momentum=0.5, beta1=0.8))
