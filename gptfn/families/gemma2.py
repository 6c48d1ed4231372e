"""Gemma 2 (``Gemma2ForCausalLM``, model_type ``gemma2``): RMSNorm as ``x * (1 + w)`` in
float32, embeddings times sqrt(d_model), four norms per block (``norm_position="sandwich"``),
attention and final logit soft-caps, a sliding window on alternating layers, attention scale
``query_pre_attn_scalar ** -0.5``, independent ``head_dim``, tanh-GeGLU, tied. Gemma 3 builds
on these helpers."""

from __future__ import annotations

from typing import Any

from gptfn.families import llama
from gptfn.families.common import (
    decoder_from_hf,
    decoder_to_hf,
    layer_types_to_hf,
    require,
    window_from_hf,
)
from gptfn.model import GPTConfig
from gptfn.shapes import Params, Tensor

MODEL_TYPE = "gemma2"
NAME = "Gemma 2"
MAPS = llama.MAPS | {
    "sliding_window", "window_pattern", "norm_position", "embed_scale", "attn_scale",
    "attn_softcap", "logit_softcap",
}  # fmt: skip
ARCHITECTURE = "Gemma2ForCausalLM"
NORMS = {
    "ln_1": "input_layernorm", "ln_attn_out": "post_attention_layernorm",
    "ln_2": "pre_feedforward_layernorm", "ln_mlp_out": "post_feedforward_layernorm",
}  # fmt: skip
FIXED = {
    "norm": "rmsnorm_plus1", "norm_position": "sandwich", "embed_scale": True, "mlp": "geglu",
    "mlp_bias": False,
}  # fmt: skip
REQUIRED = {**llama.REQUIRED, **FIXED}


def gemma_fields(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """The GPTConfig fields Gemma 2 and Gemma 3 read alike."""
    hf = {
        "hidden_activation": "gelu_pytorch_tanh", "head_dim": 256, "tie_word_embeddings": True,
        **{k: v for k, v in hf.items() if v is not None}, "mlp_bias": False,
    }  # fmt: skip
    fields = llama.fields_from_hf(hf, family) | window_from_hf(hf, hf["num_hidden_layers"])
    return fields | FIXED | {
        "attn_scale": float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        "attn_softcap": hf.get("attn_logit_softcapping"),
        "logit_softcap": hf.get("final_logit_softcapping"),
    }  # fmt: skip


def gemma_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """The config.json keys Gemma 2 and Gemma 3 write alike."""
    scalar = (cfg.attn_scale or cfg.d_head**-0.5) ** -2
    out = llama.common_to_hf(cfg)
    del out["hidden_act"]
    return out | {
        "hidden_activation": "gelu_pytorch_tanh", "attention_bias": cfg.bias,
        "query_pre_attn_scalar": round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
        "sliding_window": cfg.sliding_window, "layer_types": layer_types_to_hf(cfg),
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.logit_softcap,
    }  # fmt: skip


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from a Gemma 2 config.json."""
    return GPTConfig(**gemma_fields(hf, NAME))


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """A Gemma 2 config.json for ``cfg`` (ValueError if Gemma 2 cannot express it)."""
    require(cfg, NAME, {**REQUIRED, "qkv_bias": cfg.bias})
    return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **gemma_to_hf(cfg)}


def from_hf(state_dict: dict[str, Tensor], cfg: GPTConfig) -> Params:
    """A gptfn tree from a ``Gemma2ForCausalLM`` state dict."""
    return decoder_from_hf(state_dict, cfg, NAME, NORMS)


def to_hf(params: Params, cfg: GPTConfig) -> dict[str, Tensor]:
    """A ``Gemma2ForCausalLM`` state dict."""
    return decoder_to_hf(params, cfg, NORMS)
