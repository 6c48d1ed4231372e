"""Qwen2 (``Qwen2ForCausalLM``, model_type ``qwen2``): Llama's layout with biases on queries,
keys and values only, and sliding windows on the layers ``layer_types`` names. The weights use
Llama's names, so the converters are Llama's."""

from __future__ import annotations

from typing import Any

from gptfn.families import llama
from gptfn.families.common import require, window_from_hf, window_to_hf
from gptfn.model import GPTConfig
from gptfn.shapes import Params, Tensor

MODEL_TYPE = "qwen2"
NAME = "Qwen2"
MAPS = llama.MAPS | {"sliding_window", "window_pattern"}
ARCHITECTURE = "Qwen2ForCausalLM"


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from a Qwen2 config.json (sliding windows from ``use_sliding_window`` and
    ``layer_types`` / ``max_window_layers``)."""
    hf = {**hf, "attention_bias": False, "mlp_bias": False}
    fields = llama.fields_from_hf(hf, family="Qwen2") | window_from_hf(hf, hf["num_hidden_layers"])
    return GPTConfig(**{**fields, "qkv_bias": True})


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """A Qwen2 config.json for ``cfg`` (ValueError if Qwen2 cannot express it)."""
    require(
        cfg, NAME,
        {**llama.REQUIRED, "qkv_bias": True, "bias": False, "mlp_bias": False},
    )  # fmt: skip
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **llama.common_to_hf(cfg),
        **window_to_hf(cfg),
    }  # fmt: skip


def from_hf(state_dict: dict[str, Tensor], cfg: GPTConfig) -> Params:
    """A gptfn tree from a ``Qwen2ForCausalLM`` state dict."""
    return llama.from_hf(state_dict, cfg, family="Qwen2")


to_hf = llama.to_hf
