"""Qwen3 (``Qwen3ForCausalLM``, model_type ``qwen3``): Llama with an RMSNorm on each head's
queries and keys before rotary (``qk_norm``), an independent ``head_dim``, biases only when
``attention_bias`` says so; small models are tied and ship no ``lm_head``."""

from __future__ import annotations

from typing import Any

from gptfn.families import llama
from gptfn.families.common import require, window_from_hf, window_to_hf
from gptfn.model import GPTConfig
from gptfn.shapes import Params, Tensor

MODEL_TYPE = "qwen3"
NAME = "Qwen3"
MAPS = llama.MAPS | {"qk_norm", "sliding_window", "window_pattern"}
ARCHITECTURE = "Qwen3ForCausalLM"


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from a Qwen3 config.json."""
    fields = llama.fields_from_hf({**hf, "mlp_bias": False}, NAME)
    return GPTConfig(**fields, **window_from_hf(hf, hf["num_hidden_layers"]), qk_norm=True)


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """A Qwen3 config.json for ``cfg`` (ValueError if Qwen3 cannot express it)."""
    require(cfg, NAME, {**llama.REQUIRED, "qk_norm": True, "qkv_bias": cfg.bias, "mlp_bias": False})
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **llama.common_to_hf(cfg),
        "attention_bias": cfg.bias, **window_to_hf(cfg),
    }  # fmt: skip


def from_hf(state_dict: dict[str, Tensor], cfg: GPTConfig) -> Params:
    """A gptfn tree from a ``Qwen3ForCausalLM`` state dict."""
    return llama.from_hf(state_dict, cfg, family=NAME)


to_hf = llama.to_hf
