"""Tiny random Hugging Face models of each family, built offline from their config classes.

Every weight, norm scale and bias is randomised (HF initialises norms to 1 and biases to 0, which
would hide a swapped or dropped one); head counts are odd where the family allows, and the
Llama/Qwen2 ones use fewer key/value heads than query heads.
"""

from __future__ import annotations

import contextlib

import torch

transformers = __import__("pytest").importorskip("transformers")

COMMON = {"vocab_size": 61, "attn_implementation": "sdpa"}
LLAMA = {
    **COMMON,
    "hidden_size": 24,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "max_position_embeddings": 32,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 0,
}

FAMILY_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        **COMMON,
        n_embd=24,
        n_layer=2,
        n_head=3,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    ),
    "gpt2_untied_gelu": lambda: transformers.GPT2Config(
        **COMMON,
        n_embd=20,
        n_layer=1,
        n_head=5,
        n_positions=24,
        n_inner=36,
        activation_function="gelu",
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    ),
    "llama_gqa": lambda: transformers.LlamaConfig(
        **LLAMA, num_attention_heads=6, num_key_value_heads=2
    ),
    "llama_mqa_tied_biases": lambda: transformers.LlamaConfig(
        **LLAMA,
        num_attention_heads=3,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        head_dim=10,
    ),
    "llama3_rope_scaling": lambda: transformers.LlamaConfig(
        **{**LLAMA, "max_position_embeddings": 64},
        num_attention_heads=3,
        num_key_value_heads=3,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        **LLAMA, num_attention_heads=3, num_key_value_heads=1, rope_theta=1e6
    ),
    "neox_pythia": lambda: transformers.GPTNeoXConfig(
        **COMMON,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=3,
        max_position_embeddings=32,
        rotary_pct=0.5,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    ),
    "neox_sequential": lambda: transformers.GPTNeoXConfig(
        **COMMON,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=3,
        max_position_embeddings=32,
        rotary_pct=0.25,
        use_parallel_residual=False,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    ),
}


WINDOWED = {**LLAMA, "max_position_embeddings": 40, "attn_implementation": "eager"}
"""Families of issue 24: windows (4 or 5) shorter than the test sequences (20 tokens); eager
attention (Hugging Face's SDPA path drops Gemma 2's attention soft-cap)."""

MORE_CONFIGS = {
    "mistral": lambda: transformers.MistralConfig(
        **WINDOWED, num_attention_heads=6, num_key_value_heads=2, head_dim=6, sliding_window=5
    ),
    "mistral_full": lambda: transformers.MistralConfig(
        **WINDOWED, num_attention_heads=3, num_key_value_heads=1, sliding_window=None,
        tie_word_embeddings=True,
    ),
    "qwen3": lambda: transformers.Qwen3Config(
        **WINDOWED, num_attention_heads=3, num_key_value_heads=1, head_dim=10,
        tie_word_embeddings=True,
    ),
    "qwen3_bias": lambda: transformers.Qwen3Config(
        **WINDOWED, num_attention_heads=6, num_key_value_heads=2, head_dim=4, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
    "qwen2_window": lambda: transformers.Qwen2Config(
        **WINDOWED, num_attention_heads=6, num_key_value_heads=2, use_sliding_window=True,
        sliding_window=4, max_window_layers=1,
    ),
    "qwen3_window": lambda: transformers.Qwen3Config(
        **{**WINDOWED, "num_hidden_layers": 3}, num_attention_heads=3, num_key_value_heads=1,
        head_dim=8, use_sliding_window=True, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "olmo2": lambda: transformers.Olmo2Config(
        **WINDOWED, num_attention_heads=6, num_key_value_heads=2
    ),
    "olmo2_bias_tied": lambda: transformers.Olmo2Config(
        **WINDOWED, num_attention_heads=3, num_key_value_heads=3, attention_bias=True,
        tie_word_embeddings=True,
    ),
    "smollm3": lambda: transformers.SmolLM3Config(
        **WINDOWED, num_attention_heads=6, num_key_value_heads=2, no_rope_layer_interval=2,
    ),
    "smollm3_window": lambda: transformers.SmolLM3Config(
        **{**WINDOWED, "num_hidden_layers": 3}, num_attention_heads=3, num_key_value_heads=1,
        no_rope_layers=[1, 0, 0], use_sliding_window=True, sliding_window=4,
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        **WINDOWED, num_attention_heads=6, num_key_value_heads=2, head_dim=10,
        query_pre_attn_scalar=12, sliding_window=4, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**WINDOWED, "num_hidden_layers": 3}, num_attention_heads=3, num_key_value_heads=1,
        head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
    "gemma3_softcap_untied": lambda: transformers.Gemma3TextConfig(
        **WINDOWED, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
        sliding_window=5, attn_logit_softcapping=4.0, final_logit_softcapping=6.0,
        tie_word_embeddings=False,
    ),
    "phi3_longrope": lambda: transformers.Phi3Config(
        **WINDOWED, num_attention_heads=3, num_key_value_heads=1, sliding_window=5,
        original_max_position_embeddings=8, partial_rotary_factor=0.75,
        rope_parameters={
            "rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.5, 2.0], "long_factor": [2.0, 4.0, 7.0],
        },
    ),
    "phi4_mini_tied": lambda: transformers.Phi3Config(
        **WINDOWED, num_attention_heads=3, num_key_value_heads=1, partial_rotary_factor=0.75,
        tie_word_embeddings=True,
    ),
    "llama_linear_scaling": lambda: transformers.LlamaConfig(
        **WINDOWED, num_attention_heads=3, num_key_value_heads=1,
        rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
    ),
}  # fmt: skip
"""Random tiny models of the families added for issue 24 (tests/test_families_modern.py)."""


def hf_model(name: str, dtype: torch.dtype = torch.float32, scale: float = 1.0):
    """A random model of ``FAMILY_CONFIGS[name]`` (or ``MORE_CONFIGS``) in eval mode. ``scale``
    multiplies the matrices (peakier logits: greedy decoding then has no near-ties)."""
    table = FAMILY_CONFIGS if name in FAMILY_CONFIGS else MORE_CONFIGS
    torch.manual_seed(sorted(table).index(name))
    model = transformers.AutoModelForCausalLM.from_config(table[name]())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale if p.ndim > 1 else 1.0).add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def _rms_norm_in_input_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@contextlib.contextmanager
def exact_rms_norm():
    """Hugging Face's Llama/Qwen2 RMSNorm computes in float32 even for float64 inputs (a ~1e-7
    rounding); inside this context it keeps the input's dtype, so a float64 model is a float64
    reference. Nothing else of theirs changes."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    classes = (modeling_llama.LlamaRMSNorm, modeling_qwen2.Qwen2RMSNorm)
    saved = [cls.forward for cls in classes]
    try:
        for cls in classes:
            cls.forward = _rms_norm_in_input_dtype
        yield
    finally:
        for cls, forward in zip(classes, saved):
            cls.forward = forward
