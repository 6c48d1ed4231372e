"""Exact parity with Hugging Face GPT-2 (random weights, built offline from a config)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens

import gptfn

transformers = pytest.importorskip("transformers")

CONFIGS = [  # (vocab, positions, layers, heads, width): odd heads, odd vocab, padded positions
    (97, 32, 2, 4, 48),
    (101, 40, 1, 3, 21),
    (50, 16, 3, 5, 40),
    (257, 64, 2, 1, 8),
]


def hf_model(vocab, positions, layers, heads, width, dtype):
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_layer=layers,
        n_head=heads,
        n_embd=width,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(vocab + layers)
    model = transformers.GPT2LMHeadModel(config).to(dtype).eval()
    with torch.no_grad():  # HF zero-inits biases and unit-inits norms: randomise every leaf
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("dims", CONFIGS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_hf_parity(dims, dtype, tol):
    model = hf_model(*dims, dtype)
    tokens = random_tokens(dims[0], 3, dims[1])
    params = gptfn.from_hf_gpt2(model.state_dict(), n_head=dims[3])
    assert gptfn.GPTConfig.from_params(params).n_head == dims[3]
    with torch.no_grad():
        expected = model(tokens).logits
    ours = gptfn.forward(params, tokens)
    torch.testing.assert_close(ours, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(
        gptfn.forward(params, tokens, attention="reference"), expected, atol=tol, rtol=tol
    )


@pytest.mark.parametrize("dims", CONFIGS[:2])
def test_round_trip_into_hf(dims):
    vocab, positions, layers, heads, width = dims
    cfg = gptfn.GPTConfig(vocab, positions, layers, heads, width)
    params = gptfn.init(cfg, seed=1)
    model = hf_model(*dims, torch.float32)
    model.load_state_dict(gptfn.to_hf_gpt2(params), strict=True)
    tokens = random_tokens(vocab, 2, positions)
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens).logits, gptfn.forward(params, tokens), atol=1e-5, rtol=1e-5
        )
    back = gptfn.from_hf_gpt2(gptfn.to_hf_gpt2(params), n_head=heads)
    for path, leaf in gptfn.tree.flatten(params).items():
        assert torch.equal(gptfn.tree.flatten(back)[path], leaf), path


def test_untied_head_survives_round_trip():
    cfg = gptfn.GPTConfig(31, 8, 1, 2, 8, tie_embeddings=False)
    params = gptfn.init(cfg, seed=2)
    back = gptfn.from_hf_gpt2(gptfn.to_hf_gpt2(params), n_head=2)
    assert torch.equal(back["unembed"], params["unembed"])


def test_bad_head_count():
    params = gptfn.init(gptfn.GPTConfig(31, 8, 1, 2, 8))
    with pytest.raises(ValueError, match="n_head=3"):
        gptfn.from_hf_gpt2(gptfn.to_hf_gpt2(params), n_head=3)
