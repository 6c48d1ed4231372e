"""Activation capture and patching, logit lens, and curvature."""

from __future__ import annotations

import optree
import pytest
import torch
from conftest import random_tokens
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import gptfn
from gptfn.curvature import hutchinson_trace, hvp, top_hessian_eigenvalues
from gptfn.inspect import activation_names, logit_lens, run_with_cache, run_with_patches
from gptfn.testing import configs, models, tokens

CFG = gptfn.GPTConfig(vocab_size=23, block_size=10, n_layer=2, n_head=3, n_embd=12)


@pytest.fixture(scope="module")
def params():
    return gptfn.init(CFG, seed=0)


def test_cache_logits_equal_forward_and_shapes_are_documented(params):
    toks = random_tokens(23, 2, 7)
    logits, cache = run_with_cache(params, toks)
    torch.testing.assert_close(logits, gptfn.forward(params, toks), atol=1e-5, rtol=1e-5)
    assert list(cache) == activation_names(params)  # every name, in computation order
    b, s, d, h, k = 2, 7, 12, 3, 4
    expected = {
        "embed": (b, s, d),
        "pos_embed": (b, s, d),
        "ln_f.out": (b, s, d),
        "blocks.1.resid_pre": (b, s, d),
        "blocks.1.attn.q": (b, s, h, k),
        "blocks.1.attn.scores": (b, h, s, s),
        "blocks.1.attn.pattern": (b, h, s, s),
        "blocks.1.attn.z": (b, s, h, k),
        "blocks.1.attn.out": (b, s, d),
        "blocks.1.resid_mid": (b, s, d),
        "blocks.1.mlp.pre": (b, s, 4 * d),
        "blocks.1.mlp.post": (b, s, 4 * d),
        "blocks.1.mlp.out": (b, s, d),
        "blocks.1.resid_post": (b, s, d),
    }
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    _, only = run_with_cache(params, toks, names=lambda n: n.endswith("resid_post"))
    assert sorted(only) == ["blocks.0.resid_post", "blocks.1.resid_post"]


def test_fast_path_is_kept_unless_scores_or_pattern_are_asked_for(params, monkeypatch):
    import gptfn.model.attention as model

    calls = []
    original = model._reference_attention
    monkeypatch.setattr(model, "_reference_attention", lambda *a: calls.append(1) or original(*a))
    toks = random_tokens(23, 1, 5)
    run_with_cache(params, toks, names=["blocks.0.attn.z", "blocks.1.mlp.post"])
    assert calls == []
    run_with_cache(params, toks, names=["blocks.0.attn.pattern"])
    assert len(calls) == 1  # only the layer whose pattern is asked for leaves the fast path


def test_identity_patches_change_nothing(params):
    toks = random_tokens(23, 2, 8)
    patches = {name: (lambda x: x) for name in activation_names(params)}
    torch.testing.assert_close(
        run_with_patches(params, toks, patches), gptfn.forward(params, toks), atol=1e-5, rtol=1e-5
    )


def test_unknown_name_lists_the_valid_ones(params):
    with pytest.raises(
        KeyError,
        match=r"unknown activation names \['blocks.0.attn.hook_z'\]"
        r".*blocks.0.attn.z",
    ):
        run_with_patches(params, random_tokens(23, 1, 3), {"blocks.0.attn.hook_z": lambda x: x})


@given(models(configs(block_size=(1, 9), n_layer=(1, 2))), st.data())
def test_patterns_are_causal_distributions(model, data):
    cfg, params = model
    toks = data.draw(tokens(cfg))
    _, cache = run_with_cache(params, toks, names=lambda n: n.endswith("pattern"))
    for name, pattern in cache.items():
        upper = pattern.triu(diagonal=1)
        assert torch.equal(upper, torch.zeros_like(upper)), f"{name} attends to the future"
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))


@pytest.mark.parametrize("layer, head", [(0, 0), (1, 2)])
def test_zeroing_a_head_through_z_equals_zeroing_its_output_weights(params, layer, head):
    toks = random_tokens(23, 2, 9)

    def zero_head(z):
        z = z.clone()
        z[:, :, head] = 0
        return z

    patched = run_with_patches(params, toks, {f"blocks.{layer}.attn.z": zero_head})
    edited = optree.tree_map(torch.clone, params)
    edited["blocks"][layer]["attn"]["w_o"][head] = 0
    torch.testing.assert_close(patched, gptfn.forward(edited, toks), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(patched, gptfn.forward(params, toks))


def test_logit_lens_last_layer_equals_logits(params):
    toks = random_tokens(23, 2, 6)
    logits, cache = run_with_cache(params, toks)
    lens = logit_lens(params, cache)
    assert lens.shape == (2, 2, 6, 23)
    torch.testing.assert_close(lens[-1], logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="resid_post"):
        logit_lens(params, {})


def test_gradient_wrt_an_additive_patch_matches_finite_differences():
    params = gptfn.tree.cast(gptfn.init(CFG, seed=1), torch.float64)
    toks = random_tokens(23, 2, 6)
    name = "blocks.0.resid_mid"

    def metric(delta):
        logits = run_with_patches(params, toks, {name: lambda x: x + delta})
        return logits[:, -1].log_softmax(-1)[:, 3].sum()

    delta = torch.zeros(2, 6, 12, dtype=torch.float64)
    grad = torch.func.grad(metric)(delta)
    direction = torch.randn(
        2, 6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    eps = 1e-6
    fd = (metric(eps * direction) - metric(-eps * direction)) / (2 * eps)
    assert float((grad * direction).sum()) == pytest.approx(float(fd), rel=1e-6)
    assert grad[:, :5].abs().max() > 0  # earlier positions matter to the last one


def test_vmap_over_a_batch_of_patches_equals_a_loop(params):
    toks = random_tokens(23, 2, 5)
    deltas = torch.randn(4, 2, 5, 3, 4, generator=torch.Generator().manual_seed(1))

    def patched(delta):
        return run_with_patches(params, toks, {"blocks.1.attn.z": lambda z: z + delta})

    batched = torch.func.vmap(patched)(deltas)
    looped = torch.stack([patched(d) for d in deltas])
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- curvature

TINY = gptfn.GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, n_embd=4)


@pytest.fixture(scope="module")
def tiny_problem():
    params = gptfn.tree.cast(gptfn.init(TINY, seed=3), torch.float64)
    params = optree.tree_map(lambda x: x * 20 if x.ndim > 1 else x, params)  # more curvature
    toks = random_tokens(7, 3, 4, 5)
    targets = random_tokens(7, 3, 4, 6)

    def f(p):
        return gptfn.loss(p, toks, targets)

    leaves, spec = optree.tree_flatten(params)
    flat = torch.cat([x.reshape(-1) for x in leaves])

    def f_flat(vec):
        parts = vec.split([x.numel() for x in leaves])
        return f(optree.tree_unflatten(spec, [p.view_as(x) for p, x in zip(parts, leaves)]))

    with sdpa_kernel([SDPBackend.MATH]):  # plain autograd's double backward needs it too
        hessian = torch.autograd.functional.hessian(f_flat, flat)
    return f, params, hessian


def test_hvp_equals_explicit_hessian_times_v(tiny_problem):
    f, params, hessian = tiny_problem
    v = optree.tree_map(lambda x: torch.randn_like(x), params)
    out = hvp(f, params, v)  # the fused attention kernel alone has no forward-mode AD
    flat_v = torch.cat([x.reshape(-1) for x in optree.tree_leaves(v)])
    flat_out = torch.cat([x.reshape(-1) for x in optree.tree_leaves(out)])
    torch.testing.assert_close(flat_out, hessian @ flat_v, atol=1e-8, rtol=1e-8)


def test_top_eigenvalue_matches_eigvalsh(tiny_problem):
    f, params, hessian = tiny_problem
    exact = torch.linalg.eigvalsh(hessian).flip(0)
    n = hessian.shape[0]
    top = top_hessian_eigenvalues(f, params, k=2, iters=n, seed=0)
    assert float(top[0]) == pytest.approx(float(exact[0]), rel=1e-4)
    assert float(top[1]) == pytest.approx(float(exact[1]), rel=1e-4)


def test_hutchinson_trace_within_four_standard_errors(tiny_problem):
    f, params, hessian = tiny_problem
    estimate, stderr = hutchinson_trace(f, params, samples=200, seed=1)
    exact = float(torch.trace(hessian))
    assert stderr > 0 and abs(estimate - exact) < 4 * stderr
