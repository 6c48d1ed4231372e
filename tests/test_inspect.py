"""Activation capture and patching, logit lens, and curvature."""

from __future__ import annotations

import re
from pathlib import Path

import optree
import pytest
import torch
from conftest import random_tokens
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import gptfn
from gptfn.research.curvature import hutchinson_trace, hvp, top_hessian_eigenvalues
from gptfn.research.interp import activation_names, logit_lens, run_with_cache, run_with_patches
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


# ----------------------------------------------------------------------------- names vs docs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
WHEN = {
    "always": lambda c, i: True,
    "position=learned": lambda c, i: c.position == "learned",
    "rotary layer": lambda c, i: c.rotates(i),
    "qk_norm per head": lambda c, i: c.qk_norm and c.qk_norm_span == "head",
    "qk_norm over the projection": lambda c, i: c.qk_norm and c.qk_norm_span == "projection",
    "sequential residual": lambda c, i: not c.parallel_residual,
    "gated mlp": lambda c, i: c.mlp in ("swiglu", "geglu"),
    "pre-norm": lambda c, i: c.norm_position != "post",
    "post-norm": lambda c, i: c.norm_position != "pre",
}
NAME_VARIANTS = {
    "gpt2": {},
    "llama": {"position": "rotary", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2},
    "qk_norm": {"qk_norm": True, "position": "none"},
    "neox": {"position": "rotary", "rotary_fraction": 1 / 3, "parallel_residual": True},
    "geglu": {"mlp": "geglu", "bias": False},
    "olmo2": {
        "position": "rotary", "norm": "rmsnorm", "norm_position": "post", "qk_norm": True,
        "qk_norm_span": "projection", "n_kv_head": 2,
    },
    "gemma": {
        "position": "rotary", "norm": "rmsnorm_plus1", "norm_position": "sandwich",
        "rope_layers": "NR", "sliding_window": 2, "window_pattern": "LG", "attn_softcap": 5.0,
    },
}  # fmt: skip


def documented_names() -> list[tuple[str, str, str]]:
    """(name, shape, when) rows of the docs' activation-name table."""
    section = DOCS.read_text().split("## Activation names", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (\[[^\]]+\]) \| .* \| ([^|]+) \|$", section, flags=re.M)
    assert len(rows) > 30, "the activation-name table was not found"
    return [(name, shape, when.strip()) for name, shape, when in rows]


@pytest.mark.parametrize("variant", NAME_VARIANTS)
def test_docs_table_lists_exactly_the_names_and_shapes_the_code_produces(variant):
    dims = {
        "batch": 2,
        "seq": 3,
        "query": 3,
        "key": 3,
        "head": 4,
        "d_head": 6,
        "d_model": 20,
        "d_mlp": 7,
        "1": 1,
    }
    options = NAME_VARIANTS[variant]
    cfg = gptfn.GPTConfig(11, 8, 2, 4, 20, d_head=6, d_mlp=7, **options)
    dims["kv_head"] = cfg.n_kv_head
    dims["q_width"], dims["kv_width"] = cfg.n_head * cfg.d_head, cfg.n_kv_head * cfg.d_head
    params = gptfn.init(cfg)
    _, cache = run_with_cache(params, random_tokens(11, 2, 3))
    produced = {name: tuple(x.shape) for name, x in cache.items()}
    documented = {}
    for name, shape, when in documented_names():
        assert when in WHEN, f"unknown condition {when!r} for {name} in docs/models.md"
        for i in range(cfg.n_layer) if "{i}" in name else [None]:
            if WHEN[when](cfg, i):
                key = name.replace("{i}", str(i))
                documented[key] = tuple(dims[d] for d in shape.strip("[]").split())
    assert sorted(produced) == sorted(documented)
    assert produced == documented
    assert list(cache) == activation_names(params)


def test_norm_names_are_both_sides_of_the_norm():
    """``normalized`` is before the affine (TransformerLens's hook_normalized), ``rms`` its scale;
    ``ln_f.out`` is after the weights, which differ from 1 and 0 here."""
    params = optree.tree_map(lambda x: x + 0.5 * torch.randn_like(x), gptfn.init(CFG, seed=3))
    _, cache = run_with_cache(params, random_tokens(23, 2, 5))
    x = cache["blocks.1.resid_post"]
    centred = x - x.mean(-1, keepdim=True)
    tl_scale = (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()  # TransformerLens's formula
    torch.testing.assert_close(cache["ln_f.rms"], tl_scale)
    torch.testing.assert_close(cache["ln_f.normalized"], centred / tl_scale)
    ln_f = params["ln_f"]
    torch.testing.assert_close(
        cache["ln_f.out"], cache["ln_f.normalized"] * ln_f["scale"] + ln_f["bias"]
    )
    assert not torch.allclose(cache["ln_f.out"], cache["ln_f.normalized"], atol=1e-2)
    rms_model = gptfn.init(gptfn.GPTConfig(23, 10, 1, 3, 12, norm="rmsnorm", bias=False))
    _, cache = run_with_cache(rms_model, random_tokens(23, 2, 5), names=lambda n: "ln_1" in n)
    x = run_with_cache(rms_model, random_tokens(23, 2, 5), names=["blocks.0.resid_pre"])[1]
    rms = (x["blocks.0.resid_pre"].pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(cache["blocks.0.ln_1.rms"], rms)


def test_per_head_result_and_inputs_mean_what_they_say(params):
    toks = random_tokens(23, 2, 6)
    _, cache = run_with_cache(params, toks)
    for i in range(2):
        attn = params["blocks"][i]["attn"]
        torch.testing.assert_close(
            cache[f"blocks.{i}.attn.result"].sum(-2) + attn["b_o"], cache[f"blocks.{i}.attn.out"]
        )
    zero_result = run_with_patches(
        params, toks, {"blocks.1.attn.result": lambda r: r * torch.tensor([1.0, 0.0, 1.0])[:, None]}
    )
    edited = optree.tree_map(torch.clone, params)
    edited["blocks"][1]["attn"]["w_o"][1] = 0
    torch.testing.assert_close(zero_result, gptfn.forward(edited, toks), atol=1e-5, rtol=1e-5)

    def other_query_input(x):  # head 0's query reads another position's input
        x = x.clone()
        x[:, :, 0] = x[:, :, 0].roll(1, dims=1)
        return x

    _, patched = run_with_cache(
        params,
        toks,
        names=["blocks.0.attn.q", "blocks.0.attn.k"],
    )
    changed = {}
    run_with_patches(
        params,
        toks,
        {
            "blocks.0.attn.q_input": other_query_input,
            "blocks.0.attn.q": lambda q: changed.setdefault("q", q),
            "blocks.0.attn.k": lambda k: changed.setdefault("k", k),
        },
    )
    moved = (changed["q"] - patched["blocks.0.attn.q"]).abs().amax(dim=(0, 1, 3))
    assert moved[0] > 1e-3  # head 0 moved; the others only by matmul rounding
    torch.testing.assert_close(moved[1:], torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(changed["k"], patched["blocks.0.attn.k"])


def test_mlp_in_patches_the_mlp_branch_only(params):
    toks = random_tokens(23, 2, 6)
    _, base = run_with_cache(params, toks, names=["blocks.0.resid_mid", "blocks.0.mlp.out"])
    seen = {}
    run_with_patches(
        params,
        toks,
        {
            "blocks.0.mlp_in": torch.zeros_like,
            "blocks.0.resid_mid": lambda x: seen.setdefault("mid", x),
            "blocks.0.mlp.out": lambda x: seen.setdefault("out", x),
        },
    )
    torch.testing.assert_close(seen["mid"], base["blocks.0.resid_mid"])
    assert not torch.allclose(seen["out"], base["blocks.0.mlp.out"])


def test_rotated_queries_and_keys():
    cfg = gptfn.GPTConfig(23, 10, 1, 2, 8, position="rotary", n_kv_head=1)
    params = gptfn.init(cfg, seed=1)
    _, cache = run_with_cache(params, random_tokens(23, 1, 6))
    from gptfn.model import apply_rotary, rotary_tables

    cos, sin = rotary_tables(cfg, torch.arange(6))
    torch.testing.assert_close(
        cache["blocks.0.attn.rot_q"], apply_rotary(cache["blocks.0.attn.q"], cos, sin)
    )
    torch.testing.assert_close(cache["blocks.0.attn.rot_k"][:, 0], cache["blocks.0.attn.k"][:, 0])
    assert not torch.allclose(cache["blocks.0.attn.rot_k"], cache["blocks.0.attn.k"])


def test_costly_names_cost_nothing_unless_asked(params, monkeypatch):
    import gptfn.model.attention as attention
    import gptfn.model.layers as layers

    calls = {"per_head_inputs": 0, "fused_out": 0, "fused_norm": 0}

    def counting(module, name, key):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(attention, "_qkv_per_head_inputs", "per_head_inputs")
    counting(attention, "attention_out", "fused_out")
    counting(layers.F, "layer_norm", "fused_norm")
    toks = random_tokens(23, 2, 5)
    gptfn.forward(params, toks)
    run_with_cache(params, toks, names=["blocks.1.resid_post", "blocks.0.attn.z"])
    assert calls == {"per_head_inputs": 0, "fused_out": 4, "fused_norm": 10}
    run_with_cache(
        params, toks, names=["blocks.0.attn.result", "blocks.1.attn.k_input", "ln_f.rms"]
    )
    assert calls == {"per_head_inputs": 1, "fused_out": 5, "fused_norm": 14}


def test_cache_keeps_only_the_asked_globs_stops_early_and_moves_to_a_dtype(monkeypatch):
    from gptfn.model import attention

    cfg = gptfn.GPTConfig(vocab_size=40, block_size=16, n_layer=3, n_head=2, n_embd=16)
    params = gptfn.init(cfg, seed=3)
    toks = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    full_logits, full = gptfn.run_with_cache(params, toks)
    gptfn.activation_names(params)  # (its one meta forward runs the reference path: before)
    calls = []
    original = attention._reference_attention
    monkeypatch.setattr(
        attention, "_reference_attention", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    logits, cache = gptfn.run_with_cache(params, toks, names=["blocks.*.resid_post", "embed"])
    assert sorted(cache) == ["blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post",
                             "embed"]  # fmt: skip
    assert not calls, "the fused kernel serves when no attention pattern is asked for"
    torch.testing.assert_close(logits, full_logits)
    for name, value in cache.items():
        torch.testing.assert_close(value, full[name])
    _, cache = gptfn.run_with_cache(params, toks, names=["blocks.1.attn.pattern"])
    assert calls and cache["blocks.1.attn.pattern"].shape == (2, 2, 9, 9)  # asked: computed
    resid, cache = gptfn.run_with_cache(
        params, toks, names=["blocks.*.resid_pre"], stop_at_layer=2, dtype=torch.bfloat16
    )
    torch.testing.assert_close(resid, full["blocks.2.resid_pre"])  # the stream entering block 2
    assert sorted(cache) == ["blocks.0.resid_pre", "blocks.1.resid_pre"]
    assert all(v.dtype == torch.bfloat16 for v in cache.values())
    with pytest.raises(KeyError, match=r"come after stop_at_layer=1"):
        gptfn.run_with_cache(params, toks, names=["blocks.2.resid_post"], stop_at_layer=1)
    with pytest.raises(KeyError, match="matches no activation name"):
        gptfn.run_with_cache(params, toks, names=["blocks.*.nothing"])
    with pytest.raises(ValueError, match=r"stop_at_layer must be in \[0, 3\]"):
        gptfn.run_with_cache(params, toks, stop_at_layer=4)
