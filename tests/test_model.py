"""Properties of the pure model: causality, batch independence, attention paths, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_tokens
from hypothesis import given
from hypothesis import strategies as st

import gptfn
from gptfn.model import attend
from gptfn.shapes import Tensor
from gptfn.testing import (
    assert_batch_independent,
    assert_causal,
    assert_grads_match,
    assert_no_mutation,
    assert_vmap_matches_loop,
    configs,
    models,
    tokens,
)


def small_models(dtype: torch.dtype = torch.float32):
    return models(
        configs(vocab_size=(2, 40), block_size=(1, 12), n_head=(1, 3), head_size=(1, 6)),
        dtype=dtype,
    )


@given(small_models(torch.float64), st.data())
def test_causal(model, data):
    cfg, params = model
    assert_causal(gptfn.forward, params, data.draw(tokens(cfg, batch=(1, 3))), atol=0.0)


@given(small_models(torch.float64), st.data())
def test_batch_independent(model, data):
    cfg, params = model
    toks = data.draw(tokens(cfg, batch=(2, 4)))
    assert_batch_independent(gptfn.forward, params, toks, atol=0.0)


@given(small_models(), st.data())
def test_fast_equals_reference(model, data):
    cfg, params = model
    toks = data.draw(tokens(cfg))
    fast = gptfn.forward(params, toks, attention="fast")
    ref = gptfn.forward(params, toks, attention="reference")
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@given(
    st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(1, 8)
)
def test_attend_masked_paths_agree(batch, q_len, extra, heads, d_head):
    """With an explicit mask (queries attending to a longer cached prefix), both paths agree."""
    g = torch.Generator().manual_seed(q_len * 31 + extra)
    k_len = q_len + extra
    q = torch.randn(batch, q_len, heads, d_head, generator=g)
    k, v = (torch.randn(batch, k_len, heads, d_head, generator=g) for _ in range(2))
    mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=extra)
    fast = attend(q, k, v, impl="fast", mask=mask)
    ref = attend(q, k, v, impl="reference", mask=mask)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def _bf16_attention_case(case: str) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """bfloat16 queries [2 n 4 32], keys and values [2 m kv 32], and the mask of ``case``."""
    g = torch.Generator().manual_seed(len(case))
    n, m = (130, 160) if case == "cached" else (144, 144)
    kv = 4 if case == "mha" else 2
    q = (torch.randn(2, n, 4, 32, generator=g) * 2).bfloat16()
    k = (torch.randn(2, m, kv, 32, generator=g) * 2).bfloat16()
    v = torch.randn(2, m, kv, 32, generator=g).bfloat16()
    rows, cols = torch.arange(n)[:, None], torch.arange(m)[None, :]
    if case == "padded":  # left padding of 0 and 5 tokens, as generate's prefill builds it
        pad = torch.tensor([0, 5])[:, None, None]
        mask = (((cols >= pad) & (cols <= rows)) | (cols == rows))[:, None]
    elif case == "cached":  # 130 new queries after 30 cached keys
        mask = (cols <= rows + m - n)[None, None]
    elif case == "per_head":
        mask = (torch.rand(2, 4, n, m, generator=g) < 0.5) | (cols == rows)
    else:
        mask = None
    return q, k, v, mask


@pytest.mark.parametrize("case", ["causal", "mha", "padded", "cached", "per_head", "autocast"])
def test_blocked_bfloat16_attention_is_as_accurate_as_sdpa(case, monkeypatch):
    """bfloat16 attention without gradients (prefill, evaluation) runs in blocks of query rows
    with float32 scores: against float64 attention its error stays within 1.5x SDPA's (scores
    rounded to bfloat16 would be ~5x), over several blocks of 16 rows; under autocast too."""
    from gptfn.model import attention

    q, k, v, mask = _bf16_attention_case(case)
    truth = attend(q.double(), k.double(), v.double(), impl="reference", mask=mask)
    heads_first = (t.transpose(1, 2) for t in (q, k, v))
    sdpa = attention._sdpa(*heads_first, mask, 32**-0.5).transpose(1, 2)

    def no_sdpa(*args):
        raise AssertionError("the blocked path should have run")

    monkeypatch.setattr(attention, "_sdpa", no_sdpa)
    monkeypatch.setattr(attention, "_BLOCKED_SCORE_BYTES", 1)  # blocks of 16 query rows
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast")
    with torch.no_grad(), autocast:
        blocked = attend(q, k, v, mask=mask)
    assert blocked.dtype == torch.bfloat16 and blocked.shape == q.shape

    def rms(z: Tensor) -> float:
        return (z.double() - truth).pow(2).mean().sqrt().item()

    assert rms(blocked) <= 1.5 * rms(sdpa), (rms(blocked), rms(sdpa))


def test_blocked_attention_runs_only_where_it_applies(monkeypatch):
    """Not with gradients, under torch.func, for float32 or fewer than 128 queries; a row that
    sees no key gives SDPA's answer."""
    from gptfn.model import attention

    calls = []
    blocked = attention._blocked_attention
    monkeypatch.setattr(attention, "_blocked_attention", lambda *a: calls.append(1) or blocked(*a))
    q, k, v, _ = _bf16_attention_case("causal")
    attend(q, k, v)
    assert len(calls) == 1
    attend(q.float(), k.float(), v.float())
    attend(q[:, :127], k[:, :127], v[:, :127])
    attend(q.requires_grad_(), k, v)
    torch.func.grad(lambda x: attend(x, k, v).float().sum())(q.detach())
    torch.func.vmap(lambda x: attend(x, k, v))(q.detach()[None])
    assert len(calls) == 1
    q = q.detach()
    mask = torch.ones(144, 144, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[1, 0, 3] = False  # query 3 of row 1 sees nothing
    heads_first = [t.transpose(1, 2) for t in (q, k, v)]
    expected = attention._sdpa(*heads_first, mask, 32**-0.5).transpose(1, 2)
    torch.testing.assert_close(attend(q, k, v, mask=mask), expected, equal_nan=True, atol=0, rtol=0)
    assert len(calls) == 2


def test_compiled_bfloat16_attention_calls_the_blocked_op(monkeypatch):
    """A compiled prefill (fullgraph) runs the blocked path as one op, with eager's result."""
    from gptfn.model import attention

    calls = []
    blocked = attention._blocked_attention
    monkeypatch.setattr(attention, "_blocked_attention", lambda *a: calls.append(1) or blocked(*a))
    q, k, v, mask = _bf16_attention_case("padded")
    compiled = torch.compile(lambda *x: attend(*x, mask=mask), fullgraph=True, dynamic=False)
    with torch.no_grad():
        eager = attend(q, k, v, mask=mask)
        assert len(calls) == 1
        torch.testing.assert_close(compiled(q, k, v), eager, atol=0, rtol=0)
    assert len(calls) == 2


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_composed_bfloat16_training_attention_is_as_accurate_as_sdpa(kv_heads, monkeypatch):
    """bfloat16 causal attention under gradients (autocast training) runs as batched matmuls
    and a softmax: against float64, its output and its gradients for q, k and v are within 2x
    SDPA's error."""
    from gptfn.model import attention

    g = torch.Generator().manual_seed(kv_heads)
    q = torch.randn(2, 48, 4, 32, generator=g).bfloat16()
    k, v = (torch.randn(2, 48, kv_heads, 32, generator=g).bfloat16() for _ in range(2))
    up = torch.randn(2, 48, 4, 32, generator=g).bfloat16()

    def run(fn, dtype=None):
        leaves = [t.to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
        z = fn(*leaves)
        return [z, *torch.autograd.grad(z, leaves, up.to(z.dtype))]

    truth = run(lambda *x: attend(*x, impl="reference"), torch.float64)
    sdpa = run(
        lambda *x: attention._sdpa(*(t.transpose(1, 2) for t in x), None, 32**-0.5).transpose(1, 2)
    )
    calls = []
    composed = attention._composed_attention
    counted = lambda *a: calls.append(1) or composed(*a)  # noqa: E731
    monkeypatch.setattr(attention, "_composed_attention", counted)
    ours = run(attend)
    assert len(calls) == 1
    for name, ref, a, b in zip(["z", "dq", "dk", "dv"], truth, ours, sdpa):
        err, sdpa_err = ((x.double() - ref).pow(2).mean().sqrt().item() for x in (a, b))
        assert err <= 2 * sdpa_err, (name, err, sdpa_err)


def test_composed_attention_runs_only_where_it_applies(monkeypatch):
    """Not without gradients, for float32, under vmap, with ``impl="sdpa"`` or past its score
    budget; an unknown impl is refused by name."""
    from gptfn.model import attention

    calls = []
    composed = attention._composed_attention
    counted = lambda *a: calls.append(1) or composed(*a)  # noqa: E731
    monkeypatch.setattr(attention, "_composed_attention", counted)
    q, k, v, _ = _bf16_attention_case("causal")
    attend(q.requires_grad_(), k, v)
    assert len(calls) == 1
    attend(q.detach(), k, v)
    attend(q.float().requires_grad_(), k.float(), v.float())
    torch.func.vmap(lambda x: attend(x, k, v))(q.detach()[None].requires_grad_())
    attend(q, k, v, impl="sdpa")
    monkeypatch.setattr(attention, "_COMPOSED_SCORE_BYTES", 2 * 4 * 144 * 144 * 2 - 1)
    attend(q, k, v)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="'fast', 'sdpa' or 'reference', got 'flash'"):
        attend(q, k, v, impl="flash")  # type: ignore[arg-type]


def test_remat_forward_attends_as_its_recomputation():
    """remat's forward runs without gradients, its recomputation with them: in bfloat16 both
    take the training path, so the loss equals the plain one bit for bit."""
    cfg = gptfn.GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=4, n_embd=64)
    params = gptfn.init(cfg, seed=0)
    for block in params["blocks"]:  # scores of order 1-10 and attention that moves the
        for w in ("w_q", "w_k", "w_v", "w_o"):  # residual, as in trained models
            block["attn"][w] = block["attn"][w] * 20
    tokens = random_tokens(cfg.vocab_size, 2, 64, 1)

    def loss_and_grads(remat: bool):
        leaves = {p: x.detach().requires_grad_() for p, x in gptfn.tree.flatten(params).items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = gptfn.loss(gptfn.tree.unflatten(leaves), tokens, tokens, remat=remat)
        return value, torch.autograd.grad(value, list(leaves.values()))

    (plain, plain_grads), (remat, remat_grads) = loss_and_grads(False), loss_and_grads(True)
    assert torch.equal(plain, remat)
    for a, b in zip(plain_grads, remat_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_func_grad_matches_autograd_and_finite_differences_and_reaches_every_leaf(cfg, params):
    toks = random_tokens(cfg.vocab_size, 3, 16, 1)
    targets = random_tokens(cfg.vocab_size, 3, 16, 2)
    assert_grads_match(gptfn.loss, params, toks, targets)
    for path, g in gptfn.tree.flatten(torch.func.grad(gptfn.loss)(params, toks, targets)).items():
        if path.endswith("attn.b_k"):
            continue  # a key bias shifts every score of a query equally: softmax ignores it
        assert g.abs().max() > 0, f"no gradient reaches {path}"


def test_vmap_over_stacked_params_equals_loop(cfg):
    stacked = gptfn.tree.stack([gptfn.init(cfg, seed=s) for s in range(3)])
    assert_vmap_matches_loop(gptfn.forward, stacked, random_tokens(cfg.vocab_size, 2, 12))


def test_init_statistics():
    cfg = gptfn.GPTConfig(vocab_size=1000, block_size=256, n_layer=6, n_head=8, n_embd=256)
    params = gptfn.init(cfg, seed=0)
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    for path, leaf in gptfn.tree.flatten(params).items():
        name = path.rsplit(".", 1)[-1]
        if name == "scale":
            assert torch.equal(leaf, torch.ones_like(leaf)), path
        elif name.startswith("b") or name == "bias":
            assert torch.equal(leaf, torch.zeros_like(leaf)), path
        else:
            target = resid if name in ("w_o", "w_out") else 0.02
            assert abs(leaf.std().item() / target - 1) < 0.1, (path, leaf.std().item(), target)
            assert abs(leaf.mean().item()) < 0.1 * target, path


def test_init_is_deterministic_and_seeded(cfg):
    a, b, c = gptfn.init(cfg, seed=3), gptfn.init(cfg, seed=3), gptfn.init(cfg, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(gptfn.tree.leaves(a), gptfn.tree.leaves(b)))
    assert not torch.equal(a["wte"], c["wte"])


def test_zero_out_proj_zeros_the_residual_outputs_and_draws_the_rest_as_before(cfg):
    plain = gptfn.tree.flatten(gptfn.init(cfg, seed=5))
    zeroed = gptfn.tree.flatten(gptfn.init(cfg, seed=5, zero_out_proj=True))
    assert plain.keys() == zeroed.keys()
    outputs = [p for p in plain if p.rsplit(".", 1)[-1] in ("w_o", "w_out")]
    assert len(outputs) == 2 * cfg.n_layer
    for path in plain:
        if path in outputs:
            assert not zeroed[path].any() and plain[path].abs().min() > 0, path
        else:
            assert torch.equal(plain[path], zeroed[path]), path


def test_config_from_params_round_trips():
    cfg = gptfn.GPTConfig(11, 7, 3, 3, 21, bias=False, tie_embeddings=False)
    params = gptfn.init(cfg)
    assert gptfn.GPTConfig.from_params(params) == cfg
    assert "unembed" in params and "b_q" not in params["blocks"][0]["attn"]
    assert "bias" not in params["ln_f"]


def test_loss_ignores_minus_one_targets(cfg, params):
    tokens = random_tokens(cfg.vocab_size, 2, 10)
    targets = random_tokens(cfg.vocab_size, 2, 10, 5)
    masked = targets.clone()
    masked[:, 5:] = -1
    logits = gptfn.forward(params, tokens)[:, :5]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), targets[:, :5].reshape(-1))
    torch.testing.assert_close(gptfn.loss(params, tokens, masked), expected)


def test_forward_and_grad_do_not_mutate_params(cfg, params):
    toks = random_tokens(cfg.vocab_size, 2, 8)
    assert_no_mutation(gptfn.forward, params, toks)
    assert_no_mutation(torch.func.grad(gptfn.loss), params, toks, toks)


def test_dropout_uses_the_generator(cfg, params):
    tokens = random_tokens(cfg.vocab_size, 2, 8)

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return gptfn.forward(params, tokens, dropout=0.5, generator=gen)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    assert not torch.equal(run(1), gptfn.forward(params, tokens))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "tokens, error, words",
    [
        (torch.zeros(8, dtype=torch.long), Exception, "tokens"),  # missing batch axis
        (torch.zeros(2, 8), Exception, "tokens"),  # float ids
        (torch.full((2, 8), 97), ValueError, "id 97"),
        (torch.full((2, 8), -1), ValueError, "id -1"),
        (torch.zeros(2, 33, dtype=torch.long), ValueError, "block_size 32"),
    ],
)
def test_bad_tokens_raise_clear_errors(params, tokens, error, words):
    with pytest.raises(error, match=words):
        gptfn.forward(params, tokens)


def test_bad_targets_raise(params):
    tokens = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="targets contains id -2"):
        gptfn.loss(params, tokens, torch.full((2, 8), -2))
    with pytest.raises(Exception, match="targets"):
        gptfn.loss(params, tokens, torch.zeros(2, 7, dtype=torch.long))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="must be a multiple of n_head"):
        gptfn.GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=3, n_embd=16)
    with pytest.raises(ValueError, match="n_layer"):
        gptfn.GPTConfig(vocab_size=10, block_size=8, n_layer=0, n_head=1, n_embd=16)


def test_runtime_check_switch(params):
    tokens = torch.full((1, 4), 97)
    previous = gptfn.set_runtime_checks(False)
    try:
        assert not gptfn.runtime_checks_enabled()
        with pytest.raises(IndexError):  # the value check is skipped: the raw index error shows
            gptfn.forward(params, tokens)
    finally:
        gptfn.set_runtime_checks(previous)
    with pytest.raises(ValueError, match="id 97"):
        gptfn.forward(params, tokens)
