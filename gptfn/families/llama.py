"""Llama (``LlamaForCausalLM``, model_type ``llama``): SmolLM2, TinyLlama, Llama-2/3 shapes.

Rotary positions, RMSNorm without bias, SwiGLU MLP, grouped-query attention, biases only when
``attention_bias`` / ``mlp_bias`` say so, tied or untied unembedding. The weights are
``nn.Linear`` [out, in]; gptfn's per-head trees are views of them.
"""

from __future__ import annotations

from typing import Any

from gptfn.families.common import (
    activation,
    decoder_from_hf,
    decoder_to_hf,
    first,
    require,
    rope_from_hf,
    rope_to_hf,
)
from gptfn.model import GPTConfig
from gptfn.shapes import Params, Tensor

MODEL_TYPE = "llama"
NAME = "Llama"
MAPS = frozenset({
    "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "d_head", "d_mlp",
    "position", "rope_theta", "rotary_fraction", "rope_scaling", "norm", "norm_eps", "norm_bias",
    "mlp", "bias", "qkv_bias", "mlp_bias", "tie_embeddings",
})  # fmt: skip
"""The GPTConfig fields a Llama (or Qwen2) config.json carries."""
ARCHITECTURE = "LlamaForCausalLM"
ACTIVATIONS = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}


REQUIRED = {
    "position": "rotary", "rotary_fraction": 1.0, "norm": "rmsnorm", "norm_bias": False,
    "mlp": ("swiglu", "geglu"),
}  # fmt: skip
"""What every Llama-shaped family needs of a config."""


def fields_from_hf(hf: dict[str, Any], family: str = "Llama") -> dict[str, Any]:
    """The GPTConfig fields of a Llama-shaped config.json (families derived from Llama
    change a few)."""
    n_head = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    rope = rope_from_hf(hf, family)
    rope["rotary_fraction"] = 1.0  # Llama rotates every dim of each head
    return dict(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_embd=hf["hidden_size"],
        n_kv_head=first(hf, "num_key_value_heads", default=n_head),
        d_head=hf.get("head_dim"),
        d_mlp=hf["intermediate_size"],
        position="rotary",
        **rope,
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_bias=False,
        mlp=activation(first(hf, "hidden_act", "hidden_activation", default="silu"),
                       ACTIVATIONS, family),
        bias=bias,
        qkv_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )  # fmt: skip


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from a Llama config.json."""
    return GPTConfig(**fields_from_hf(hf))


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """A Llama config.json for ``cfg`` (ValueError if Llama cannot express it)."""
    require(cfg, NAME, {**REQUIRED, "qkv_bias": cfg.bias})
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **common_to_hf(cfg),
        "attention_bias": cfg.bias, "mlp_bias": cfg.mlp_bias,
    }  # fmt: skip


def common_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """The config.json keys the Llama-shaped families share."""
    return {
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.d_head, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.d_mlp, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu" if cfg.mlp == "swiglu" else "gelu_pytorch_tanh",
        "tie_word_embeddings": cfg.tie_embeddings, **rope_to_hf(cfg),
    }  # fmt: skip


def from_hf(state_dict: dict[str, Tensor], cfg: GPTConfig, family: str = "Llama") -> Params:
    """A gptfn tree from a ``LlamaForCausalLM`` (or Qwen2, Mistral, Qwen3) state dict."""
    return decoder_from_hf(state_dict, cfg, family)


def to_hf(params: Params, cfg: GPTConfig) -> dict[str, Tensor]:
    """A ``LlamaForCausalLM`` (or Qwen2, Mistral, Qwen3) state dict (loads with ``strict``)."""
    return decoder_to_hf(params, cfg)
