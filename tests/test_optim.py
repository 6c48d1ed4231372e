"""Functional optimizers: equal to torch.optim, pure, and the same on both leaf paths."""

from __future__ import annotations

import copy

import optree
import pytest
import torch

import gptfn
import gptfn.optim as optim


def _random_tree(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(5, 3, generator=g),
        "blocks": [{"b": torch.randn(3, generator=g)}, {"m": torch.randn(2, 2, 2, generator=g)}],
    }


def _grads(step: int, like: dict) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    return optree.tree_map(lambda x: torch.randn(x.shape, generator=g), like)


def _run(tx: optim.GradientTransformation, params: dict, steps: int = 20) -> dict:
    state = tx.init(params)
    for s in range(steps):
        updates, state = tx.update(_grads(s, params), state, params)
        params = optim.apply_updates(params, updates)
    return params


def _run_torch(make_opt, params: dict, steps: int = 20) -> dict:
    leaves, spec = optree.tree_flatten(params)
    tensors = [torch.nn.Parameter(x.clone()) for x in leaves]
    opt = make_opt(tensors)
    for s in range(steps):
        for t, g in zip(tensors, optree.tree_leaves(_grads(s, params))):
            t.grad = g.clone()
        opt.step()
    return optree.tree_unflatten(spec, [t.detach() for t in tensors])


def _assert_trees_close(a: dict, b: dict, tol: float) -> None:
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_torch(fused):
    params = _random_tree()
    previous = optim.set_foreach(fused)
    try:
        ours = _run(optim.adamw(1e-2, 0.9, 0.95, 1e-8, weight_decay=0.1, mask=None), params)
    finally:
        optim.set_foreach(previous)
    theirs = _run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        params,
    )
    _assert_trees_close(ours, theirs, 1e-6)


def test_adamw_default_mask_decays_matrices_only():
    params = _random_tree()
    ours = _run(optim.adamw(1e-2, weight_decay=0.5), params)
    leaves = optree.tree_leaves(params)
    matrices = [i for i, x in enumerate(leaves) if x.ndim >= 2]

    def make(ps):
        groups = [
            {"params": [ps[i] for i in matrices], "weight_decay": 0.5},
            {"params": [p for i, p in enumerate(ps) if i not in matrices], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=1e-2)

    _assert_trees_close(ours, _run_torch(make, params), 1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_torch(nesterov):
    params = _random_tree(1)
    ours = _run(optim.sgd(0.05, momentum=0.9, nesterov=nesterov), params)
    theirs = _run_torch(
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=nesterov), params
    )
    _assert_trees_close(ours, theirs, 1e-6)


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0])
def test_clip_matches_torch(max_norm):
    grads = _grads(0, _random_tree())
    ((clipped, _),) = [optim.clip_by_global_norm(max_norm).update(grads, {})]
    tensors = [torch.nn.Parameter(torch.zeros_like(g)) for g in optree.tree_leaves(grads)]
    for t, g in zip(tensors, optree.tree_leaves(grads)):
        t.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    for ours, t in zip(optree.tree_leaves(clipped), tensors):
        torch.testing.assert_close(ours, t.grad, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim.adamw(1e-2),
        lambda: optim.lion(1e-3),
        lambda: optim.sgd(0.1, 0.9, True),
        lambda: optim.muon(0.02, adam_learning_rate=1e-2),
        lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2)),
    ],
)
def test_fused_and_leafwise_paths_agree_and_inputs_are_not_mutated(make):
    params = _random_tree(2)
    before = copy.deepcopy(params)
    previous = optim.set_foreach(True)
    fused = _run(make(), params, 5)
    optim.set_foreach(False)
    leafwise = _run(make(), params, 5)
    optim.set_foreach(previous)
    _assert_trees_close(fused, leafwise, 1e-6)
    _assert_trees_close(params, before, 0.0)
    assert not all(
        torch.equal(a, b) for a, b in zip(optree.tree_leaves(fused), optree.tree_leaves(params))
    )


def test_optimizer_runs_under_vmap_and_grad():
    params = _random_tree(3)
    tx = optim.adamw(1e-2)
    stacked = gptfn.tree.stack([params, _random_tree(4)])
    state = torch.func.vmap(tx.init)(stacked)
    grads = gptfn.tree.stack([_grads(0, params)] * 2)
    updates, _ = torch.func.vmap(tx.update)(grads, state, stacked)
    alone, _ = tx.update(_grads(0, params), tx.init(params), params)
    _assert_trees_close(gptfn.tree.unstack(updates)[0], alone, 1e-6)

    def after_one_step(lr: torch.Tensor) -> torch.Tensor:
        tx = optim.sgd(lr)
        updates, _ = tx.update(_grads(0, params), tx.init(params), params)
        new = optim.apply_updates(params, updates)
        return sum(x.sum() for x in optree.tree_leaves(new))

    d = torch.func.grad(after_one_step)(torch.tensor(0.1))
    expected = -sum(g.sum() for g in optree.tree_leaves(_grads(0, params)))
    torch.testing.assert_close(d, expected)


def test_lion_updates_are_signs():
    params = _random_tree()
    tx = optim.scale_by_lion()
    updates, _ = tx.update(_grads(0, params), tx.init(params), params)
    assert all(set(x.abs().unique().tolist()) <= {0.0, 1.0} for x in optree.tree_leaves(updates))


def test_newton_schulz_orthogonalises():
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    o = optim.newton_schulz(g, steps=10)
    singular = torch.linalg.svdvals(o)
    assert singular.min() > 0.5 and singular.max() < 1.5  # Muon's iteration lands near 1


def test_masked_with_path_predicate():
    params = _random_tree()
    tx = optim.masked(optim.scale(0.0), lambda path, leaf: path.startswith("blocks"))
    updates, _ = tx.update(_grads(0, params), tx.init(params), params)
    assert torch.equal(updates["w"], _grads(0, params)["w"])
    assert torch.equal(updates["blocks"][0]["b"], torch.zeros(3))


def test_warmup_cosine_schedule():
    sched = optim.warmup_cosine_decay_schedule(0.0, 1.0, 10, 110, 0.1)
    values = [float(sched(torch.tensor(s))) for s in (0, 5, 10, 60, 110, 200)]
    assert values[0] == 0.0 and abs(values[1] - 0.5) < 1e-6 and abs(values[2] - 1.0) < 1e-6
    assert (
        abs(values[3] - 0.55) < 1e-6 and abs(values[4] - 0.1) < 1e-6 and abs(values[5] - 0.1) < 1e-6
    )
    with pytest.raises(ValueError, match="decay_steps"):
        optim.warmup_cosine_decay_schedule(0, 1, 10, 5, 0)
