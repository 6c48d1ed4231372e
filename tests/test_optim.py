"""Functional optimizers: equal to torch.optim, pure, and the same on both leaf paths."""

from __future__ import annotations

import copy
import doctest
import math

import optree
import pytest
import torch

import gptfn
import gptfn.optim as optim
import gptfn.train.optimizer_options as train_options


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
            t.grad = g.to(t.dtype)
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


def _adam_by_passes(grads, mu, nu, count):
    """Adam's moments and direction by the unfused foreach passes (fused kernel refused)."""
    ops = optim.base.LeafOps(fused=True)
    t = torch.tensor(float(count), dtype=torch.float64)
    c1, c2 = 1 - 0.9**t, 1 - 0.95**t
    mu, nu = ops.lerp(mu, grads, 0.1), ops.lerp_square(nu, grads, 0.05)
    return ops.adam_direction(mu, nu, c1, c2, 1e-8), mu, nu


@pytest.mark.parametrize("donate", [False, True])
def test_the_fused_adam_kernel_matches_the_foreach_passes(donate):
    leaves = optree.tree_leaves(_random_tree(5))
    grads = [g * 0.1 for g in leaves] + [torch.randn(6, 9).T]  # and a transposed leaf,
    grads += [torch.randn(4, dtype=torch.float64)]  # and one in float64 after float32 ones
    mu, nu = [torch.randn_like(g) * 0.01 for g in grads], [torch.rand_like(g) * 1e-3 for g in grads]
    assert grads[-2].stride() == mu[-2].stride() == (1, 9)  # the moments share its layout
    want_dir, want_mu, want_nu = _adam_by_passes(grads, mu, nu, 3)
    g, m, v = ([x.clone() for x in xs] for xs in (grads, mu, nu))
    with optim.donated(donate):
        out = optim.leaf_ops().adam_fused(g, m, v, (0.9, 0.95, 1e-8), torch.tensor(3))
    assert out is not None  # CPU float32: the kernel is taken
    direction, new_mu, new_nu = out
    for a, b in zip(direction + new_mu + new_nu, want_dir + want_mu + want_nu):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0)  # a few float32 ulps
    if donate:  # the moments in place, the direction in the gradients' buffers
        assert all(a is b for a, b in zip(direction + new_mu + new_nu, g + m + v))
    else:  # nothing passed in was touched
        assert all(torch.equal(a, b) for a, b in zip(g + m + v, grads + mu + nu))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_adamw_kernel_may_write_the_direction_over_its_gradient(dtype):
    """adam_fused's premise: torch's fused AdamW kernel given the gradient as its parameter
    (lr -1, weight decay -1) leaves exactly what it leaves in a separate zero parameter with
    plain Adam, at sizes that end in a partial vector and on a transposed leaf."""
    for grad in [torch.randn(n, dtype=dtype) for n in (1, 7, 33, 1000, 4099)] + [
        torch.randn(9, 6, dtype=dtype).T
    ]:
        mu, nu = torch.randn_like(grad) * 0.1, torch.rand_like(grad)
        hyper = dict(beta1=0.9, beta2=0.95, eps=1e-8, amsgrad=False, maximize=False)
        step = [torch.tensor(5.0)]
        want, want_mu, want_nu = torch.zeros_like(grad), mu.clone(), nu.clone()
        torch._fused_adam_([want], [grad], [want_mu], [want_nu], [], step, lr=-1.0,
                           weight_decay=0.0, **hyper)  # fmt: skip
        got, got_mu, got_nu = grad.clone(), mu.clone(), nu.clone()
        torch._fused_adamw_([got], [got], [got_mu], [got_nu], [], step, lr=-1.0,
                            weight_decay=-1.0, **hyper)  # fmt: skip
        assert got.stride() == grad.stride()
        for a, b in ((got, want), (got_mu, want_mu), (got_nu, want_nu)):
            assert torch.equal(a, b)


def test_the_fused_adam_kernel_is_not_used_where_it_would_change_numbers():
    bf16 = [torch.randn(3, 2).bfloat16()]
    ops = optim.leaf_ops()
    assert ops.adam_fused(bf16, bf16, bf16, (0.9, 0.95, 1e-8), torch.tensor(1)) is None
    wide, tall = [torch.randn(3, 2)], [torch.randn(2, 3).T]  # one shape, two memory orders
    assert ops.adam_fused(wide, tall, wide, (0.9, 0.95, 1e-8), torch.tensor(1)) is None
    f32 = [torch.randn(3, 2)]
    hyper = (torch.tensor(0.9), 0.95, 1e-8)  # a tensor hyper-parameter (it may need grad)
    assert ops.adam_fused(f32, f32, f32, hyper, torch.tensor(1)) is None
    unfused = optim.base.LeafOps(fused=False)
    assert unfused.adam_fused(f32, f32, f32, (0.9, 0.95, 1e-8), torch.tensor(1)) is None


def test_a_known_norm_is_used_only_for_the_same_unmodified_tensors():
    from gptfn.optim.base import known_norm

    grads = [torch.ones(2, 2), torch.ones(3)]
    ops, fake = optim.leaf_ops(), torch.tensor(123.0)  # a wrong value shows where it was used
    with known_norm(grads, fake):
        assert ops.norm(grads) is fake
        assert ops.norm([grads[0], torch.ones(3)]) != fake  # other tensors: computed
        grads[1].mul_(2)  # modified in place since: computed again
        torch.testing.assert_close(ops.norm(grads), torch.tensor(4.0))
    assert ops.norm([torch.ones(2, 2), torch.ones(3)]) == torch.tensor(7.0).sqrt()


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


def test_warmup_stable_decay_schedule():
    sched = optim.warmup_stable_decay_schedule(0.0, 1.0, 10, 60, 110, 0.1)
    got = [float(sched(torch.tensor(s))) for s in (0, 5, 10, 35, 60, 85, 110, 200)]
    assert got == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1], abs=1e-12)
    with pytest.raises(ValueError, match="decay_start"):
        optim.warmup_stable_decay_schedule(0, 1, 10, 5, 20, 0)


def test_lr_schedule_wsd_holds_the_peak_then_decays_the_last_fraction():
    cfg = train_options.OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=10, schedule="wsd",
                                decay_fraction=0.25)  # fmt: skip
    sched = train_options.lr_schedule(cfg, total_steps=100)
    got = [float(sched(torch.tensor(s))) for s in (5, 10, 75, 90, 100)]
    assert got == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2 - 0.6 * 9e-3, 1e-3], abs=1e-12)
    muon_part = train_options.lr_schedule(cfg, 100, peak=0.05)  # the same shape at another peak
    assert float(muon_part(torch.tensor(100))) == pytest.approx(5e-3)
    with pytest.raises(
        train_options.OptionError, match="schedule: invalid value 'linear': one of cosine"
    ):
        train_options.OptimizerConfig(schedule="linear")


# ----------------------------------------------------------------------------- float64 parity


def _fp64_tree(seed: int = 0) -> dict:
    return optree.tree_map(lambda x: x.double(), _random_tree(seed))


def _grads64(step: int, like: dict) -> dict:
    return optree.tree_map(lambda x: x.double(), _grads(step, like))


def _adamw_by_formula(params: dict, steps: int, lr, b1, b2, eps, wd) -> dict:
    """optax's adamw written out: moments, bias corrections in Python floats (float64)."""
    leaves, spec = optree.tree_flatten(params)
    mu = [torch.zeros_like(p) for p in leaves]
    nu = [torch.zeros_like(p) for p in leaves]
    for s in range(steps):
        t = s + 1
        grads = optree.tree_leaves(_grads64(s, params))
        mu = [b1 * m + (1 - b1) * g for m, g in zip(mu, grads)]
        nu = [b2 * v + (1 - b2) * g * g for v, g in zip(nu, grads)]
        mu_hat = [m / (1 - b1**t) for m in mu]
        nu_hat = [v / (1 - b2**t) for v in nu]
        leaves = [
            p - lr * (m / (v.sqrt() + eps) + wd * p) for p, m, v in zip(leaves, mu_hat, nu_hat)
        ]
    return optree.tree_unflatten(spec, leaves)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_float64_matches_torch_and_optax_formulas_to_1e12(fused):
    params = _fp64_tree()
    previous = optim.set_foreach(fused)
    try:
        tx = optim.adamw(1e-2, 0.9, 0.999, 1e-8, weight_decay=0.1, mask=None)
        state = tx.init(params)
        ours = params
        for s in range(100):
            updates, state = tx.update(_grads64(s, params), state, ours)
            ours = optim.apply_updates(ours, updates)
    finally:
        optim.set_foreach(previous)
    theirs = _run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
        params,
        steps=100,
    )
    assert all(x.dtype == torch.float64 for x in optree.tree_leaves(theirs))
    _assert_trees_close(ours, theirs, 1e-12)
    _assert_trees_close(ours, _adamw_by_formula(params, 100, 1e-2, 0.9, 0.999, 1e-8, 0.1), 1e-12)


def _sgd_by_formula(params: dict, lrs: list[float]) -> dict:
    for s, lr in enumerate(lrs):
        params = optree.tree_map(lambda p, g, lr=lr: p - lr * g, params, _grads64(s, params))
    return params


def _warmup_cosine(t: int, init: float, peak: float, warm: int, decay: int, end: float) -> float:
    if t < warm:
        return init + (peak - init) * t / warm
    progress = min(max((t - warm) / (decay - warm), 0.0), 1.0)
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("fused", [True, False])
def test_schedules_keep_float64_learning_rates(fused):
    params = _fp64_tree()
    args = (0.0, 0.1 + 3e-9, 3, 10, 0.0123456789)  # float32 would round each of these
    lrs = [_warmup_cosine(t, *args) for t in range(12)]

    def run(tx: optim.GradientTransformation, steps: int) -> dict:
        p, state = params, tx.init(params)
        for s in range(steps):
            updates, state = tx.update(_grads64(s, params), state, p)
            p = optim.apply_updates(p, updates)
        return p

    previous = optim.set_foreach(fused)
    try:
        cosine = run(optim.sgd(optim.warmup_cosine_decay_schedule(*args)), 12)
        constant = run(optim.sgd(optim.constant_schedule(0.1 + 3e-9)), 3)
    finally:
        optim.set_foreach(previous)
    _assert_trees_close(cosine, _sgd_by_formula(params, lrs), 1e-15)
    _assert_trees_close(constant, _sgd_by_formula(params, [0.1 + 3e-9] * 3), 1e-15)
    tx = optim.inject_hyperparams(optim.sgd)(
        learning_rate=optim.warmup_cosine_decay_schedule(*args)
    )
    state = tx.init(params)
    for _ in range(5):
        _, state = tx.update(_grads64(0, params), state, params)
    recorded = state.hyperparams["learning_rate"]
    assert recorded.dtype == torch.float64 and float(recorded) == lrs[4]


def test_schedules_and_bias_corrections_keep_float32_leaves_float32():
    params = {"w": torch.ones(3, 2), "scalar": torch.ones(())}
    for tx in (optim.sgd(optim.constant_schedule(0.1)), optim.adamw(1e-3)):
        updates, _ = tx.update(params, tx.init(params), params)
        assert all(u.dtype == torch.float32 for u in optree.tree_leaves(updates))
        stacked = gptfn.tree.stack([params, params])
        batched, _ = torch.func.vmap(tx.update)(stacked, torch.func.vmap(tx.init)(stacked), stacked)
        assert all(u.dtype == torch.float32 for u in optree.tree_leaves(batched))
    state = optim.inject_hyperparams(optim.sgd)(learning_rate=optim.constant_schedule(0.1)).init(
        params
    )
    assert state.hyperparams["learning_rate"].dtype == torch.float32


# ----------------------------------------------------------------------------- Muon's layout


def _paper_muon(g_out_in: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Jordan et al.'s Muon direction for a torch [out, in] weight: quintic Newton–Schulz on
    the wide orientation, then scale by sqrt(max(1, rows / cols))."""
    a, b, c = 3.4445, -4.7750, 2.0315
    rows, cols = g_out_in.shape
    x = g_out_in / (g_out_in.norm() + eps)
    if rows > cols:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if rows > cols:
        x = x.T
    return x * max(1.0, rows / cols) ** 0.5


# gptfn's layout (d = 16, 4 heads of 4, 2 key/value heads, d_mlp = 64): name -> fan-in axes
LAYOUT = {
    "w_q": ((16, 4, 4), 1),
    "w_k": ((16, 2, 4), 1),  # grouped-query attention
    "w_o": ((4, 4, 16), 2),
    "w_in": ((16, 64), 1),
    "w_gate": ((16, 64), 1),  # a SwiGLU gate
    "w_out": ((64, 16), 1),
}


def _paper_muon_in_gptfn_layout(g: torch.Tensor, n_fan_in: int) -> torch.Tensor:
    fan_in = math.prod(g.shape[:n_fan_in])
    out_in = g.reshape(fan_in, -1).T  # torch's [out, in]
    return _paper_muon(out_in).T.reshape(g.shape)


def test_muon_scales_by_fan_out_over_fan_in_in_gptfn_layout():
    gen = torch.Generator().manual_seed(0)
    block = {
        k: torch.randn(shape, generator=gen, dtype=torch.float64)
        for k, (shape, _) in LAYOUT.items()
    }
    params = {"blocks": [block]}
    grads = [optree.tree_map(lambda x: torch.randn_like(x), params) for _ in range(2)]
    tx = optim.scale_by_muon(momentum=0.95, nesterov=True)
    state = tx.init(params)
    momentum = optree.tree_map(torch.zeros_like, params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        momentum = optree.tree_map(lambda m, x: x + 0.95 * m, momentum, g)
        for name, (_, n_fan_in) in LAYOUT.items():
            direction = g["blocks"][0][name] + 0.95 * momentum["blocks"][0][name]
            expected = _paper_muon_in_gptfn_layout(direction, n_fan_in)
            torch.testing.assert_close(
                updates["blocks"][0][name], expected, atol=1e-12, rtol=1e-12, msg=name
            )
    assert optim.leading_fan_in_axes("w_o", params["blocks"][0]["w_o"]) == (0, 1)


def test_muon_momentum_can_warm_up_on_a_schedule():
    gen = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(8, 4, generator=gen, dtype=torch.float64)}
    grads = [{"w": torch.randn(8, 4, generator=gen, dtype=torch.float64)} for _ in range(4)]
    betas = optim.linear_schedule(0.5, 0.9, 2)  # 0.5, 0.7, 0.9, 0.9
    tx = optim.scale_by_muon(momentum=betas, nesterov=True)
    state, m = tx.init(params), torch.zeros_like(params["w"])
    assert int(state["count"]) == 0 and "count" not in optim.scale_by_muon(0.9).init(params)
    for t, g in enumerate(grads):
        beta = (0.5, 0.7, 0.9, 0.9)[t]
        updates, state = tx.update(g, state, params)
        m = g["w"] + beta * m
        expected = _paper_muon_in_gptfn_layout(g["w"] + beta * m, 1)
        torch.testing.assert_close(updates["w"], expected, atol=1e-12, rtol=1e-12)
    assert int(state["count"]) == 4
    cfg = train_options.OptimizerConfig(
        optimizer="muon", muon_momentum=0.9, muon_momentum_warmup=10
    )
    rise = train_options.muon_momentum(cfg)
    assert [round(float(rise(torch.tensor(t))), 9) for t in (0, 5, 10, 99)] == [
        0.85,
        0.875,
        0.9,
        0.9,
    ]
    assert train_options.muon_momentum(cfg.__class__(optimizer="muon", muon_momentum=0.8)) == 0.8
    flat = optim.linear_schedule(0.5, 0.9, 0)(torch.tensor(0))  # no ramp: a tensor all the same
    assert isinstance(flat, torch.Tensor) and flat.dtype == torch.float64 and float(flat) == 0.9
    with pytest.raises(
        train_options.OptionError, match=r"muon_momentum: invalid value 1\.0: must be"
    ):
        train_options.OptimizerConfig(muon_momentum=1.0)


def test_fan_in_rule_reads_every_attention_shape_in_gptfn_layout():
    for d in range(1, 25):
        for heads in range(1, d + 1):
            for d_head in range(1, d + 1):
                w_q = torch.empty(d, heads, d_head, device="meta")  # w_k, w_v and GQA alike
                assert math.prod(w_q.shape[a] for a in optim.leading_fan_in_axes("", w_q)) == d
                w_o = torch.empty(heads, d_head, d, device="meta")
                fan_in = math.prod(w_o.shape[a] for a in optim.leading_fan_in_axes("", w_o))
                assert fan_in == heads * d_head or heads == d, (heads, d_head, d)


def test_muon_fan_in_rule_is_overridable_and_checked():
    gen = torch.Generator().manual_seed(1)
    out_in = {"w": torch.randn(64, 16, generator=gen, dtype=torch.float64)}  # torch's layout
    tx = optim.scale_by_muon(nesterov=False, fan_in_axes=lambda path, leaf: (1,))
    updates, _ = tx.update(out_in, tx.init(out_in))
    torch.testing.assert_close(updates["w"], _paper_muon(out_in["w"]), atol=1e-12, rtol=1e-12)
    for bad in [(), (0, 1), (2,), (0, 0)]:
        tx = optim.scale_by_muon(fan_in_axes=lambda path, leaf, bad=bad: bad)
        with pytest.raises(ValueError, match=r"fan_in_axes gave .* for w of shape \(64, 16\)"):
            tx.update(out_in, tx.init(out_in))
    with pytest.raises(ValueError, match="needs a >=2-D leaf"):
        tx = optim.scale_by_muon()
        tx.update({"b": torch.ones(3)}, tx.init({"b": torch.ones(3)}))


def test_newton_schulz_eps_is_exposed():
    g = {"w": torch.eye(4, 2, dtype=torch.float64) * 1e-3}  # fan-in 4, fan-out 2: scale 1
    results = []
    for eps in (1e-7, 1.0):
        tx = optim.scale_by_muon(nesterov=False, eps=eps)
        results.append(tx.update(g, tx.init(g))[0]["w"])
        torch.testing.assert_close(results[-1], _paper_muon(g["w"].T, eps=eps).T)
        mu = optim.muon(1.0, nesterov=False, eps=eps, muon_mask=lambda path, leaf: True)
        torch.testing.assert_close(mu.update(g, mu.init(g), g)[0]["w"], -results[-1])
    assert not torch.allclose(results[0], results[1])


def test_optimizer_docstring_examples_run():
    for module in (optim.aliases, optim.schedules, optim.hyperparams):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def _step_both_ways(tx, params: dict, steps: int, donate: bool) -> tuple[dict, dict, dict, dict]:
    """``steps`` updates of ``tx`` by update + apply_updates and by update_and_apply."""
    chain_p, fused_p = optree.tree_map(torch.clone, params), optree.tree_map(torch.clone, params)
    chain_s, fused_s = tx.init(chain_p), tx.init(fused_p)
    for s in range(steps):
        grads = optree.tree_map(lambda g, p: g.to(p.dtype), _grads(s, params), params)
        updates, chain_s = tx.update(grads, chain_s, chain_p)
        chain_p = optim.apply_updates(chain_p, updates)
        grads = optree.tree_map(lambda g, p: g.to(p.dtype), _grads(s, params), params)
        with optim.donated(donate):
            fused_p, fused_s = optim.update_and_apply(tx, grads, fused_s, fused_p)
    return chain_p, chain_s, fused_p, fused_s


def _count_kernel_calls(monkeypatch) -> list[int]:
    calls, kernel = [0], torch._fused_adamw_

    def counted(*args, **kwargs):
        calls[0] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counted)
    return calls


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        lambda: optim.adamw(1e-2, 0.9, 0.95, weight_decay=0.1),  # matrices decayed, rest not
        lambda: optim.adamw(optim.linear_schedule(0.0, 1e-2, 3), weight_decay=0.1, mask=None),
        lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2)),  # README's
        lambda: train_options.make_optimizer(
            train_options.OptimizerConfig(grad_clip=0.5, warmup_steps=2), 10
        ),  # clipped on every step (the random gradients' norm is ~5)
        lambda: train_options.make_optimizer(train_options.OptimizerConfig(grad_clip=100.0), 10),
        lambda: train_options.make_optimizer(train_options.OptimizerConfig(grad_clip=0.0), 10),
    ],
)
def test_update_and_apply_is_adamw_in_one_kernel_pass(make, donate, monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    tx, params = make(), _random_tree()
    assert tx.fused_step is not None
    chain_p, chain_s, fused_p, fused_s = _step_both_ways(tx, params, 6, donate)
    assert calls[0] >= 6  # the kernel updated the params (one call per decay rate)
    _assert_trees_close(fused_p, chain_p, 2e-6)  # a few float32 ulps apart
    assert optree.tree_structure(fused_s) == optree.tree_structure(chain_s)  # same checkpoints
    _assert_trees_close(fused_s, chain_s, 2e-6)
    assert not all(torch.equal(a, b) for a, b in zip(_leaves(fused_p), _leaves(params)))


def _leaves(tree) -> list[torch.Tensor]:
    return optree.tree_leaves(tree)


def test_update_and_apply_equals_torch_fused_adamw_bit_for_bit():
    params = _random_tree()
    tx = optim.adamw(1e-2, 0.9, 0.95, 1e-8, weight_decay=0.1, mask=None)
    state, ours = tx.init(params), params
    for s in range(20):
        ours, state = optim.update_and_apply(tx, _grads(s, params), state, ours)
    make = lambda ps: torch.optim.AdamW(ps, 1e-2, (0.9, 0.95), 1e-8, 0.1, fused=True)  # noqa: E731
    theirs = _run_torch(make, params)
    assert all(torch.equal(a, b) for a, b in zip(_leaves(ours), _leaves(theirs)))


def test_update_and_apply_touches_nothing_it_is_given_unless_donated():
    tx = train_options.make_optimizer(train_options.OptimizerConfig(grad_clip=0.5), 10)
    params, grads = _random_tree(), _grads(0, _random_tree())
    state = tx.init(params)
    given = copy.deepcopy((params, grads, state))
    new_params, _ = optim.update_and_apply(tx, grads, state, params)
    for a, b in zip(_leaves((params, grads, state)), _leaves(given)):
        assert torch.equal(a, b)  # the kernel divides the gradients it is given: a copy here
    with optim.donated():
        donated_params, _ = optim.update_and_apply(tx, grads, state, params)
    pointers = [
        (a.data_ptr(), b.data_ptr()) for a, b in zip(_leaves(params), _leaves(donated_params))
    ]
    assert all(a == b for a, b in pointers)  # donated: updated where they lie
    _assert_trees_close(donated_params, new_params, 0.0)


def test_update_and_apply_steps_by_the_chain_where_the_kernel_does_not_apply(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    params = _random_tree()
    previous = optim.set_foreach(False)  # leaf-by-leaf ops (as under vmap or compile)
    try:
        chain_p, _, fused_p, _ = _step_both_ways(optim.adamw(1e-2), params, 3, True)
    finally:
        optim.set_foreach(previous)
    assert calls[0] == 0
    _assert_trees_close(fused_p, chain_p, 0.0)
    bf16 = optree.tree_map(lambda x: x.bfloat16(), params)
    tx = optim.adamw(1e-2)
    out, _ = optim.update_and_apply(tx, optree.tree_map(torch.ones_like, bf16), tx.init(bf16), bf16)
    assert calls[0] == 0 and all(x.dtype == torch.bfloat16 for x in _leaves(out))
    clipped = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2))  # refused after
    chain_p, _, fused_p, _ = _step_both_ways(clipped, bf16, 3, True)  # the clip ran in place
    assert calls[0] == 0
    _assert_trees_close(fused_p, chain_p, 0.0)
    owned = train_options.make_optimizer(
        train_options.OptimizerConfig(), 10, owned=lambda path, leaf: path == "w"
    )
    assert owned.fused_step is None  # ZeRO-1 zeroes the others' updates: no fused step
