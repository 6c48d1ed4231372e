"""Research transforms: module bridge, inject_hyperparams, ensembles, per-example grads, DP,
meta-gradients through the optimizer."""

from __future__ import annotations

import warnings

import optree
import pytest
import torch
from conftest import random_tokens

import gptfn
import gptfn.optim as optim
from gptfn.optim import inject_hyperparams, set_hyperparams

CFG = gptfn.GPTConfig(vocab_size=29, block_size=12, n_layer=2, n_head=2, n_embd=16)


def _batch(seed: int, rows: int = 4):
    toks = random_tokens(CFG.vocab_size, rows, CFG.block_size + 1, seed)
    return toks[:, :-1], toks[:, 1:]


# ----------------------------------------------------------------------------- module bridge


def test_gpt_module_state_dict_and_functional_call():
    params = gptfn.init(CFG, seed=0)
    module = gptfn.GPTModule(params)
    assert sorted(module.state_dict()) == sorted(gptfn.tree.flatten(params))
    tokens, _ = _batch(0)
    other = gptfn.init(CFG, seed=1)
    out = torch.func.functional_call(module, gptfn.tree.flatten(other), (tokens,))
    assert torch.equal(out, gptfn.forward(other, tokens))
    assert torch.equal(module(tokens), gptfn.forward(params, tokens))
    back = module.to_params()
    assert all(
        a is not None and torch.equal(a, b)
        for a, b in zip(gptfn.tree.leaves(back), gptfn.tree.leaves(params))
    )


@pytest.mark.parametrize("share", [False, True])
def test_torch_optim_on_module_leaves_the_tree_unless_shared(share):
    params = gptfn.init(CFG, seed=0)
    before = optree.tree_map(torch.clone, params)
    module = gptfn.GPTModule(params, share=share)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    gptfn.loss(module.to_params(), *_batch(0)).backward()
    opt.step()
    moved = module.blocks[1].attn.w_q
    assert not torch.equal(moved, before["blocks"][1]["attn"]["w_q"])
    aliased = moved.data_ptr() == params["blocks"][1]["attn"]["w_q"].data_ptr()
    unchanged = [
        torch.equal(a, b) for a, b in zip(gptfn.tree.leaves(params), gptfn.tree.leaves(before))
    ]
    if share:  # the module's parameters are the tree's tensors: the step rewrote the tree
        assert aliased and not all(unchanged)
    else:  # copies, as load_state_dict makes: the caller's tree is as it was
        assert not aliased and all(unchanged)


def test_torch_optim_on_module_matches_gptfn_optim():
    params = gptfn.init(CFG, seed=0)
    module = gptfn.GPTModule(params)  # a copy: gptfn's steps below start from the same tree
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tx = optim.adamw(3e-3, 0.9, 0.95, weight_decay=0.1, mask=None)
    step = gptfn.make_train_step(tx)
    state = tx.init(params)
    for s in range(10):
        tokens, targets = _batch(s)
        opt.zero_grad()
        gptfn.loss(module.to_params(), tokens, targets).backward()
        opt.step()
        params, state, _ = step(params, state, (tokens, targets))
    tokens, _ = _batch(99)
    # compare functions, not raw params: the key bias has a true gradient of zero, so Adam
    # turns float noise there into lr-sized steps that differ between two correct runs
    torch.testing.assert_close(module(tokens), gptfn.forward(params, tokens), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- hyper-parameters


def test_inject_hyperparams_state_and_set():
    tx = inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=0.1, b1=0.9)
    params = gptfn.init(CFG)
    state = tx.init(params)
    assert set(state.hyperparams) == {"learning_rate", "weight_decay", "b1"}
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-3)
    faster = set_hyperparams(state, learning_rate=1e-2)
    grads = torch.func.grad(gptfn.loss)(params, *_batch(0))
    slow, _ = tx.update(grads, state, params)
    fast, new_state = tx.update(grads, faster, params)
    assert float(new_state.hyperparams["learning_rate"]) == pytest.approx(1e-2)
    torch.testing.assert_close(fast["wte"], slow["wte"] * 10, rtol=1e-5, atol=1e-8)
    plain, _ = optim.adamw(1e-3, weight_decay=0.1).update(
        grads, optim.adamw(1e-3).init(params), params
    )
    torch.testing.assert_close(slow["wte"], plain["wte"])
    with pytest.raises(KeyError, match="unknown hyper-parameters"):
        set_hyperparams(state, momentum=0.5)


def test_schedules_are_evaluated_and_recorded():
    sched = optim.warmup_cosine_decay_schedule(0.0, 1.0, 2, 10, 0.0)
    tx = inject_hyperparams(optim.sgd)(learning_rate=sched)
    params = gptfn.init(CFG)
    state = tx.init(params)
    grads = optree.tree_map(torch.ones_like, params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.5)
    assert float(updates["wte"][0, 0]) == pytest.approx(-0.5)


def test_fused_and_leafwise_optimizer_paths_agree_inside_the_step():
    params = gptfn.init(CFG)
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2))
    step = gptfn.make_train_step(tx)
    eager = step(params, tx.init(params), _batch(0))[0]  # fused foreach path
    stacked = gptfn.tree.stack([params])
    batched = torch.func.vmap(step, in_dims=(0, 0, None))(
        stacked, torch.func.vmap(tx.init)(stacked), _batch(0)
    )[0]  # leaf-by-leaf path
    tokens, _ = _batch(1)
    torch.testing.assert_close(
        gptfn.forward(eager, tokens),
        gptfn.forward(gptfn.tree.unstack(batched)[0], tokens),
        atol=1e-5,
        rtol=1e-5,
    )


# ----------------------------------------------------------------------------- ensembles


def test_vmapped_ensemble_equals_members_trained_alone():
    lrs = torch.tensor([1e-3, 3e-3, 1e-2, 3e-2])
    tx = inject_hyperparams(optim.adamw)(learning_rate=1e-3, weight_decay=0.1)
    step = gptfn.make_train_step(tx)
    members = [gptfn.init(CFG, seed=s) for s in range(4)]
    stacked = gptfn.tree.stack(members)
    state = set_hyperparams(torch.func.vmap(tx.init)(stacked), learning_rate=lrs)
    data = [
        torch.stack([_batch(10 * i + s)[k] for i in range(4)]) for s in range(5) for k in (0, 1)
    ]
    vstep = torch.func.vmap(step, in_dims=(0, 0, 0))
    ens_losses = []
    for s in range(5):
        stacked, state, metrics = vstep(stacked, state, (data[2 * s], data[2 * s + 1]))
        ens_losses.append(metrics["loss"])
    tokens, _ = _batch(123)
    for i, params in enumerate(members):
        alone = set_hyperparams(tx.init(params), learning_rate=float(lrs[i]))
        for s in range(5):
            params, alone, metrics = step(params, alone, (data[2 * s][i], data[2 * s + 1][i]))
            torch.testing.assert_close(metrics["loss"], ens_losses[s][i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            gptfn.forward(gptfn.tree.unstack(stacked)[i], tokens),
            gptfn.forward(params, tokens),
            atol=1e-4,
            rtol=1e-4,
        )


def test_dropout_inside_a_vmapped_step_differs_per_member():
    tx = optim.sgd(0.1)
    step = gptfn.make_train_step(tx, dropout=0.5)
    stacked = gptfn.tree.stack([gptfn.init(CFG, seed=0)] * 2)
    vstep = torch.func.vmap(step, in_dims=(0, 0, None), randomness="different")
    _, _, metrics = vstep(stacked, torch.func.vmap(tx.init)(stacked), _batch(0))
    assert metrics["loss"][0] != metrics["loss"][1]


# ----------------------------------------------------------------------------- per-example


def test_per_example_grads_equal_a_loop_without_warnings():
    params = gptfn.init(CFG, seed=0)
    tokens, targets = _batch(3, rows=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "There is a performance drop ... batching rule"
        grads, losses = gptfn.per_example_grads(params, tokens, targets)
    for i in range(5):
        g = torch.func.grad(gptfn.loss)(params, tokens[i : i + 1], targets[i : i + 1])
        for a, b in zip(gptfn.tree.leaves(grads), gptfn.tree.leaves(g)):
            torch.testing.assert_close(a[i], b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            losses[i], gptfn.loss(params, tokens[i : i + 1], targets[i : i + 1])
        )


def test_dp_aggregate_without_noise_and_huge_clip_is_the_mean():
    params = gptfn.init(CFG, seed=0)
    grads, _ = gptfn.per_example_grads(params, *_batch(4))
    dp = optim.differentially_private_aggregate(l2_norm_clip=1e9, noise_multiplier=0.0)
    out, _ = dp.update(grads, dp.init(params))
    for a, b in zip(gptfn.tree.leaves(out), gptfn.tree.leaves(grads)):
        torch.testing.assert_close(a, b.mean(dim=0), atol=1e-7, rtol=1e-5)


def test_dp_aggregate_clips_each_example():
    params = gptfn.init(CFG, seed=0)
    grads, _ = gptfn.per_example_grads(params, *_batch(5))
    norms = optim.per_example_global_norms(grads)
    clip = float(norms.min()) / 2
    dp = optim.differentially_private_aggregate(l2_norm_clip=clip, noise_multiplier=0.0)
    for i in range(norms.shape[0]):
        one = optree.tree_map(lambda g, i=i: g[i : i + 1], grads)
        out, _ = dp.update(one, dp.init(params))
        assert float(gptfn.tree.global_norm(out)) == pytest.approx(clip, rel=1e-4)
        assert float(gptfn.tree.global_norm(out)) <= clip * (1 + 1e-5)


def test_dp_noise_has_the_promised_std():
    params = {"w": torch.zeros(200, 500)}
    grads = {"w": torch.zeros(1, 200, 500)}
    dp = optim.differentially_private_aggregate(l2_norm_clip=0.5, noise_multiplier=1.3, seed=7)
    out, state = dp.update(grads, dp.init(params))
    n = out["w"].numel()
    std = float(out["w"].std())
    # the sample std of n normals has standard error ~ sigma / sqrt(2n): allow 4 of them
    assert abs(std - 0.65) < 4 * 0.65 / (2 * n) ** 0.5
    assert abs(float(out["w"].mean())) < 4 * 0.65 / n**0.5
    again, _ = dp.update(grads, state)
    assert not torch.equal(again["w"], out["w"])  # fresh noise every step


# ----------------------------------------------------------------------------- meta-gradients


def test_meta_gradient_through_three_adamw_steps_matches_finite_differences():
    cfg = gptfn.GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=8)
    params = gptfn.tree.cast(gptfn.init(cfg, seed=0), torch.float64)
    tx = inject_hyperparams(optim.adamw)(learning_rate=1e-2, weight_decay=0.1)
    step = gptfn.make_train_step(tx)
    batches = [tuple(random_tokens(11, 3, 6, s + k) for k in (0, 50)) for s in range(4)]

    def val_loss_after_3_steps(hyper: torch.Tensor) -> torch.Tensor:
        state = set_hyperparams(
            tx.init(params), learning_rate=hyper[0].exp(), weight_decay=hyper[1]
        )
        p = params
        for batch in batches[:3]:
            p, state, _ = step(p, state, batch)
        return gptfn.loss(p, *batches[3])

    hyper = torch.tensor([-4.0, 0.1], dtype=torch.float64)
    meta = torch.func.grad(val_loss_after_3_steps)(hyper)
    eps = 1e-6
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = eps
        fd = (val_loss_after_3_steps(hyper + e) - val_loss_after_3_steps(hyper - e)) / (2 * eps)
        assert float(meta[i]) == pytest.approx(float(fd), rel=1e-5)
