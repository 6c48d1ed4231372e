"""Hugging Face families both ways: GPT-2, Llama, Qwen2, GPT-NeoX (random tiny models built
offline): equal logits (1e-5 in float32, 1e-10 in float64), greedy generation on a ragged batch
token for token, and trees that load back into the HF class with ``strict=True``."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens
from hf_models import FAMILY_CONFIGS, exact_rms_norm, hf_model

import gptfn

NAMES = list(FAMILY_CONFIGS)


def max_logit_diff(name: str, dtype: torch.dtype, attention: str = "fast") -> float:
    model = hf_model(name, dtype)
    params = gptfn.from_hf(model.state_dict(), model.config)
    tokens = random_tokens(61, 3, 20, 7)
    with torch.no_grad(), exact_rms_norm():
        expected = model(tokens).logits
    ours = gptfn.forward(params, tokens, attention=attention)
    assert ours.dtype == dtype and expected.abs().max() > 0.1
    return float((ours - expected).abs().max())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_logits_equal_hf(name, dtype, tol):
    assert max_logit_diff(name, dtype) < tol
    assert max_logit_diff(name, dtype, attention="reference") < tol


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_on_a_ragged_batch_equals_hf(name):
    model = hf_model(name, scale=4.0)  # peaky logits: no greedy near-ties
    params = gptfn.from_hf(model.state_dict(), model.config)
    prompts = [[5, 17, 42, 8, 3], [9, 2], [33, 4, 11]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[:, width:].tolist()
    assert gptfn.generate(params, prompts, 8, temperature=0) == theirs


@pytest.mark.parametrize("name", NAMES)
def test_to_hf_loads_strictly_and_round_trips(name):
    model = hf_model(name)
    params = gptfn.from_hf(model.state_dict(), model.config)
    fresh = gptfn.init(gptfn.GPTConfig.from_params(params), seed=3)  # different weights
    model.load_state_dict(gptfn.to_hf(fresh), strict=True)
    tokens = random_tokens(61, 2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, gptfn.forward(fresh, tokens))
    back = gptfn.from_hf(gptfn.to_hf(fresh), model.config)
    flat, back_flat = gptfn.tree.flatten(fresh), gptfn.tree.flatten(back)
    assert flat.keys() == back_flat.keys()
    assert all(torch.equal(flat[k], back_flat[k]) for k in flat)
    assert gptfn.GPTConfig.from_params(back) == gptfn.GPTConfig.from_params(fresh)


@pytest.mark.parametrize(
    "name, model_type",
    [("gpt2", "gpt2"), ("llama_gqa", "llama"), ("qwen2", "qwen2"), ("neox_pythia", "gpt_neox")],
)
def test_hf_config_names_the_family(name, model_type):
    model = hf_model(name)
    params = gptfn.from_hf(model.state_dict(), model.config)
    config = gptfn.families.hf_config(params)
    assert config["model_type"] == model_type
    assert config["architectures"] == [type(model).__name__]


def test_bias_free_gpt2_is_written_with_zero_biases():
    cfg = gptfn.GPTConfig(vocab_size=61, block_size=32, n_layer=1, n_head=3, n_embd=24, bias=False)
    params = gptfn.init(cfg, seed=4)
    model = hf_model("gpt2")
    model.load_state_dict(gptfn.to_hf(params), strict=False)  # gpt2's config has 2 layers
    sd = gptfn.to_hf(params)
    assert torch.equal(sd["transformer.h.0.attn.c_attn.bias"], torch.zeros(72))


def test_configs_no_family_holds_are_clear_errors():
    cfg = gptfn.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, mlp="relu2")
    with pytest.raises(ValueError, match=r"no Hugging Face family fits.*mlp='relu2'"):
        gptfn.to_hf(gptfn.init(cfg))
    with pytest.raises(ValueError, match="Llama cannot hold position='learned'"):
        gptfn.to_hf(gptfn.init(cfg), "llama")


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"model_type 'mamba' is not supported.*gpt2.*llama.*"):
        gptfn.from_hf({}, {"model_type": "mamba"})


def test_leftover_weights_are_reported():
    model = hf_model("llama_gqa")
    sd = dict(model.state_dict()) | {"model.layers.0.self_attn.q_norm.weight": torch.ones(4)}
    with pytest.raises(ValueError, match=r"unexpected keys for a Llama model.*q_norm"):
        gptfn.from_hf(sd, model.config)


def test_unsupported_rope_type_is_named():
    config = hf_model("llama_gqa").config.to_dict()
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        gptfn.families.llama.config_from_hf(config)


def test_legacy_gpt2_converter_still_works():
    model = hf_model("gpt2")
    params = gptfn.from_hf_gpt2(model.state_dict(), n_head=3)
    tokens = random_tokens(61, 2, 9)
    with torch.no_grad():
        torch.testing.assert_close(gptfn.forward(params, tokens), model(tokens).logits)
