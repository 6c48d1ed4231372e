"""Generation with the KV cache: equal to full forward, ragged batches, sampling controls, HF."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens
from hypothesis import given
from hypothesis import strategies as st

import gptfn
from gptfn.generation import (
    extend,
    generate,
    generate_stream,
    init_cache,
    sample_logits,
)


@pytest.fixture(scope="module")
def model():
    cfg = gptfn.GPTConfig(vocab_size=53, block_size=24, n_layer=2, n_head=3, n_embd=24)
    params = gptfn.init(cfg, seed=5)
    return gptfn.tree.map_with_path(lambda _, x: x * 5 if x.ndim > 1 else x, params)  # peakier


@given(st.integers(1, 3), st.integers(1, 24), st.data())
def test_cached_decoding_equals_full_forward(model, batch, total, data):
    split = data.draw(st.integers(1, total), label="prefill length")
    seq = random_tokens(53, batch, total, data.draw(st.integers(0, 999)))
    full = gptfn.forward(model, seq)
    cache = init_cache(model, batch, total)
    logits, cache = extend(model, seq[:, :split], cache)
    pieces = [logits]
    for i in range(split, total):
        logits, cache = extend(model, seq[:, i : i + 1], cache)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@given(st.lists(st.lists(st.integers(0, 52), min_size=1, max_size=12), min_size=1, max_size=4))
def test_ragged_batch_equals_each_prompt_alone(model, prompts):
    together = generate(model, prompts, 6, temperature=0)
    alone = [generate(model, [p], 6, temperature=0)[0] for p in prompts]
    assert together == alone


def test_left_padding_never_changes_logits(model):
    short = [3, 1, 4]
    cache = init_cache(model, 1, 3)
    alone, _ = extend(model, torch.tensor([short]), cache)
    padded = torch.tensor([[0] * 5 + short, list(range(8))])
    cache = init_cache(model, 2, 8, pad=torch.tensor([5, 0]))
    logits, _ = extend(model, padded, cache)
    torch.testing.assert_close(logits[0, 5:], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logits).all()


def test_top_k_one_is_greedy_and_seed_is_reproducible(model):
    prompts = [[1, 2, 3], [7]]
    greedy = generate(model, prompts, 8, temperature=0)
    assert generate(model, prompts, 8, temperature=1.0, top_k=1, seed=3) == greedy
    a = generate(model, prompts, 8, temperature=1.0, seed=11)
    assert a == generate(model, prompts, 8, temperature=1.0, seed=11)
    assert a != generate(model, prompts, 8, temperature=1.0, seed=12)


@given(
    st.lists(st.floats(-5, 5), min_size=2, max_size=12), st.floats(0.05, 1.0), st.integers(0, 99)
)
def test_top_p_never_samples_outside_the_nucleus(logit_list, top_p, seed):
    logits = torch.tensor(logit_list)
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    mass, nucleus = 0.0, set()
    for i in order.tolist():  # smallest set of most likely tokens whose mass reaches top_p
        nucleus.add(i)
        mass += float(probs[i])
        if mass >= top_p - 1e-6:
            break
    gen = torch.Generator().manual_seed(seed)
    draws = sample_logits(logits.expand(64, -1), 1.0, top_p=top_p, generator=gen)
    ties = {
        i
        for i in range(len(logit_list))
        if any(abs(float(probs[i] - probs[j])) < 1e-6 for j in nucleus)
    }
    assert set(draws.tolist()) <= nucleus | ties


def test_eos_stops_a_row_and_stream_matches(model):
    prompts = [[1, 2], [5, 6, 7]]
    free = generate(model, prompts, 10, temperature=0)
    eos = free[0][2]
    stopped = generate(model, prompts, 10, temperature=0, eos_token_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    streamed = list(generate_stream(model, prompts, 10, temperature=0, eos_token_id=eos))
    assert [t for step in streamed for t in step[:1] if t is not None] == stopped[0]


def test_context_overflow_is_an_error_unless_sliding(model):
    prompt = list(range(20))
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(model, [prompt], 10)
    out = generate(model, [prompt], 10, temperature=0, roll_context=True)
    assert len(out[0]) == 10
    # after the window slides, the next token is what a full forward over the last window gives
    history = prompt + out[0]
    window = torch.tensor([history[-24:-1]])
    assert int(gptfn.forward(model, window)[0, -1].argmax()) == history[-1]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 3)
    with pytest.raises(ValueError, match="id 53"):
        generate(model, [[53]], 3)


def test_matches_hf_greedy_generate():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=61,
        n_positions=32,
        n_layer=2,
        n_head=4,
        n_embd=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(8.0)  # sharper distributions: greedy ties are unlikely
    params = gptfn.from_hf_gpt2(hf.state_dict(), n_head=4)
    prompt = [5, 17, 42, 8]
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            min_new_tokens=12,
            eos_token_id=None,
        )[0, len(prompt) :].tolist()
    assert generate(params, [prompt], 12, temperature=0)[0] == theirs


def test_prompts_as_a_2d_tensor_or_clear_errors(model):
    as_lists = generate(model, [[1, 2, 3], [4, 5, 6]], 2, temperature=0)
    assert gptfn.generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), 2, temperature=0) == as_lists
    assert gptfn.generate(model, [torch.tensor([1, 2, 3])], 2, temperature=0) == as_lists[:1]
    assert len(gptfn.generate(model, torch.tensor([[1, 2, 3]]), 2)[0]) == 2  # issue 13's example
    with pytest.raises(ValueError, match=r"2-D integer tensor \[batch, seq\].*got a 1-D"):
        gptfn.generate(model, torch.tensor([1, 2, 3]), 2)
    with pytest.raises(ValueError, match=r"got a 2-D torch\.float32 tensor"):
        gptfn.generate(model, torch.zeros(1, 3), 2)
    with pytest.raises(ValueError, match="encode text with a tokenizer first"):
        gptfn.generate(model, "hello", 2)
    with pytest.raises(ValueError, match="prompt 1 must be a list of int token ids"):
        gptfn.generate(model, [[1, 2], [1.5]], 2)


def test_cache_is_static_shaped_and_holds_kv_heads_only():
    cfg = gptfn.GPTConfig(vocab_size=11, block_size=12, n_layer=1, n_head=4, n_embd=16, n_kv_head=1)
    params = gptfn.init(cfg)
    cache = init_cache(params, 2, 10)
    assert cache["layers"][0]["k"].shape == (2, 10, 1, 4)  # a quarter of a 4-head cache
    buffers = [layer[n].data_ptr() for layer in cache["layers"] for n in "kv"]
    _, cache = extend(params, torch.tensor([[1, 2, 3], [4, 5, 6]]), cache)
    _, cache = extend(params, torch.tensor([[7], [8]]), cache)
    assert isinstance(cache["length"], torch.Tensor) and int(cache["length"]) == 4
    assert [layer[n].data_ptr() for layer in cache["layers"] for n in "kv"] == buffers
    with pytest.raises(ValueError, match="4 used, 7 more do not fit"):
        extend(params, torch.zeros(2, 7, dtype=torch.long), cache)


def test_whole_buffer_attention_of_a_compiled_step_equals_eager(model, monkeypatch):
    """Compiled, a step attends over the whole buffer (one shape for every step); eager, over the
    filled slots. Both give the same logits."""
    seq = random_tokens(53, 2, 9, 1)

    def run():
        cache = init_cache(model, 2, 12, pad=torch.tensor([0, 2]))
        logits, cache = extend(model, seq[:, :5], cache)
        pieces = [logits]
        for i in range(5, 9):
            logits, cache = extend(model, seq[:, i : i + 1], cache)
            pieces.append(logits)
        return pieces

    eager = run()
    widths = []
    original = gptfn.model.attention.update_cache
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(
        gptfn.model.attention,
        "update_cache",
        lambda c, k, v, slots, width: widths.append(width) or original(c, k, v, slots, width),
    )
    whole_buffer = run()
    assert set(widths) == {12}
    for a, b in zip(eager, whole_buffer):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
