"""The families of issue 24 (Mistral, Qwen3, ...) against Hugging Face's own classes, with
random tiny models built offline (``hf_models.MORE_CONFIGS``): sliding windows shorter than
the sequences, fewer key/value heads than query heads, random norm weights. Logits within 1e-4
(relative) in float32 and within Hugging Face's own bfloat16 error in bfloat16; greedy
generation on a ragged batch past the window; ``save_pretrained`` folders that
``AutoModelForCausalLM`` loads; capture and patching."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens
from hf_models import MORE_CONFIGS, hf_model, transformers

import gptfn
from gptfn.research.interp import run_with_cache, run_with_patches

NAMES = list(MORE_CONFIGS)
TOKENS = random_tokens(61, 3, 20, 7)


def logit_errors(name: str) -> dict[str, float]:
    """Largest logit differences, relative to the largest logit of HF's float32 model: ours and
    HF's in float32, ours in bfloat16, HF's in bfloat16 (both against HF's float32)."""
    model = hf_model(name)
    with torch.no_grad():
        ref = model(TOKENS).logits
        hf_bf16 = model.to(torch.bfloat16)(TOKENS).logits.float()
    model = hf_model(name)
    params = gptfn.from_hf(model.state_dict(), model.config)
    ours = gptfn.forward(params, TOKENS)
    ours_bf16 = gptfn.forward(gptfn.tree.cast(params, torch.bfloat16), TOKENS).float()
    scale = float(ref.abs().max())
    assert scale > 0.1
    return {
        "fp32": float((ours - ref).abs().max()) / scale,
        "fp32_reference": float((gptfn.forward(params, TOKENS, attention="reference") - ref)
                                .abs().max()) / scale,
        "bf16": float((ours_bf16 - ref).abs().max()) / scale,
        "hf_bf16": float((hf_bf16 - ref).abs().max()) / scale,
    }  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_hf(name):
    errors = logit_errors(name)
    print(name, {k: f"{v:.2e}" for k, v in errors.items()})
    assert errors["fp32"] < 1e-4 and errors["fp32_reference"] < 1e-4
    assert errors["bf16"] <= 1.5 * errors["hf_bf16"] + 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_on_a_ragged_batch_equals_hf_past_the_window(name):
    model = hf_model(name, scale=4.0)  # peaky logits: no greedy near-ties
    params = gptfn.from_hf(model.state_dict(), model.config)
    prompts = [[5, 17, 42, 8, 3, 9, 30], [9, 2], [33, 4, 11]]
    theirs = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(
                torch.tensor([p]), max_new_tokens=9, min_new_tokens=9, do_sample=False,
                pad_token_id=0, eos_token_id=None,
            )  # fmt: skip
            theirs.append(out[0, len(p) :].tolist())
    assert gptfn.generate(params, prompts, 9, temperature=0) == theirs


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_loads_in_transformers_with_the_same_logits(name, tmp_path):
    model = hf_model(name)
    params = gptfn.from_hf(model.state_dict(), model.config)
    fresh = gptfn.init(gptfn.GPTConfig.from_params(params), seed=3)  # different weights
    fresh = gptfn.tree.map_with_path(lambda _, x: x + 0.1 * torch.randn_like(x), fresh)
    folder = gptfn.save_pretrained(fresh, tmp_path / name, model_type=model.config.model_type)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, output_loading_info=True, attn_implementation=model.config._attn_implementation
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, gptfn.forward(fresh, TOKENS))
    back = gptfn.from_hf(gptfn.to_hf(fresh), loaded.config)
    assert gptfn.GPTConfig.from_params(back) == gptfn.GPTConfig.from_params(fresh)


@pytest.mark.parametrize("name", NAMES)
def test_capture_and_patching_work(name):
    model = hf_model(name)
    params = gptfn.from_hf(model.state_dict(), model.config)
    logits, cache = run_with_cache(params, TOKENS[:, :9])
    torch.testing.assert_close(logits, gptfn.forward(params, TOKENS[:, :9]))
    last = f"blocks.{len(params['blocks']) - 1}.resid_post"
    patched = run_with_patches(params, TOKENS[:, :9], {"blocks.0.attn.z": torch.zeros_like})
    assert last in cache and not torch.allclose(patched, logits)


@pytest.mark.parametrize(
    "name, family, field",
    [("mistral", "qwen3", "qk_norm"), ("qwen3", "mistral", "qk_norm"),
     ("mistral", "llama", "sliding_window"), ("gemma2", "gemma3_text", "attn_softcap"),
     ("gemma3", "gemma2", "qk_norm"), ("olmo2", "llama", "norm_position"),
     ("smollm3", "llama", "rope_layers"), ("phi4_mini_tied", "llama", "rotary_fraction"),
     ("gemma3", "phi3", "rope_local_theta")],
)  # fmt: skip
def test_a_tree_the_family_cannot_hold_is_refused_by_name(name, family, field):
    model = hf_model(name)
    params = gptfn.from_hf(model.state_dict(), model.config)
    with pytest.raises(ValueError, match=field):
        gptfn.to_hf(params, family)


def test_one_windowed_layer_sees_only_the_window():
    cfg = gptfn.GPTConfig(vocab_size=11, block_size=12, n_layer=1, n_head=2, n_embd=8,
                          position="rotary", sliding_window=3)  # fmt: skip
    params = gptfn.init(cfg, seed=1)
    tokens = random_tokens(11, 1, 12, 2)
    changed = tokens.clone()
    changed[0, :4] = (changed[0, :4] + 1) % 11  # positions 0..3: outside the window of 6..
    same, moved = gptfn.forward(params, tokens), gptfn.forward(params, changed)
    torch.testing.assert_close(same[:, 6:], moved[:, 6:])
    assert not torch.allclose(same[:, 4:6], moved[:, 4:6])


COMPILED = {
    "window": {"sliding_window": 3},
    "window_post_norm": {
        "sliding_window": 3, "window_pattern": "LG", "norm": "rmsnorm", "norm_position": "post",
        "qk_norm": True, "qk_norm_span": "projection",
    },
    "gemma_like": {
        "sliding_window": 3, "window_pattern": "LG", "norm": "rmsnorm_plus1",
        "norm_position": "sandwich", "embed_scale": True, "attn_scale": 0.4, "attn_softcap": 3.0,
        "rope_local_theta": 50.0, "rope_scaling": "linear,2", "rope_layers": "RRN",
    },
    "longrope": {"rope_scaling": ("longrope", 8, 1.2, 1, 2, 3, 4), "sliding_window": 5},
}  # fmt: skip


@pytest.mark.parametrize("name", COMPILED)
def test_compiles_fullgraph_and_compiled_generation_equals_eager(name):
    cfg = gptfn.GPTConfig(vocab_size=13, block_size=24, n_layer=3, n_head=2, n_embd=8,
                          position="rotary", **COMPILED[name])  # fmt: skip
    params = gptfn.init(cfg, seed=2)
    params = gptfn.tree.map_with_path(lambda _, x: x * 5 if x.ndim > 1 else x + 0.2, params)
    gptfn.testing.assert_compile_matches_eager(
        gptfn.forward, params, random_tokens(13, 2, 10),
        more_args=[(params, random_tokens(13, 2, 10, 1))],
    )  # fmt: skip
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    eager = gptfn.generate(params, prompts, 10, temperature=0)
    assert gptfn.generate(params, prompts, 10, temperature=0, compile=True) == eager
    with torch.compiler.set_stance("fail_on_recompile"):  # other tokens: the same graphs
        again = gptfn.generate(params, [[2, 3, 4, 5, 6], [7, 8]], 10, temperature=0, compile=True)
    assert again == gptfn.generate(params, [[2, 3, 4, 5, 6], [7, 8]], 10, temperature=0)


def test_gemma3_multimodal_folders_give_their_text_model():
    """Both layouts of ``gemma3`` (multimodal) weights: ``model.language_model.*`` (transformers
    5) and ``language_model.model.*`` (older files); the vision weights are left out."""
    vision = transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=14,
    )  # fmt: skip
    config = transformers.Gemma3Config(
        text_config=MORE_CONFIGS["gemma3"](), vision_config=vision, mm_tokens_per_image=4,
        image_token_index=60, boi_token_index=58, eoi_token_index=59,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        expected = model(input_ids=TOKENS[:, :12] % 50).logits
    new = model.state_dict()
    old = {
        k.replace("model.language_model.", "language_model.model.").replace(
            "lm_head.", "language_model.lm_head."
        ): v
        for k, v in new.items()
    }
    for state_dict in (new, old):
        params = gptfn.from_hf(state_dict, config.to_dict())
        ours = gptfn.forward(params, TOKENS[:, :12] % 50)
        assert float((ours - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    assert gptfn.families.hf_config(params)["model_type"] == "gemma3_text"
