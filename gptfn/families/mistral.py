"""Mistral (``MistralForCausalLM``, model_type ``mistral``): Llama with a sliding window on
every layer (when ``sliding_window`` is set) and an explicit ``head_dim``; no biases."""

from __future__ import annotations

from typing import Any

from gptfn.families import llama
from gptfn.families.common import require
from gptfn.model import GPTConfig
from gptfn.shapes import Params, Tensor

MODEL_TYPE = "mistral"
NAME = "Mistral"
MAPS = llama.MAPS | {"sliding_window"}
ARCHITECTURE = "MistralForCausalLM"


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from a Mistral config.json."""
    fields = llama.fields_from_hf({**hf, "attention_bias": False, "mlp_bias": False}, NAME)
    return GPTConfig(**fields, sliding_window=hf.get("sliding_window"))


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """A Mistral config.json for ``cfg`` (ValueError if Mistral cannot express it)."""
    require(cfg, NAME, {**llama.REQUIRED, "bias": False, "qkv_bias": False, "mlp_bias": False})
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **llama.common_to_hf(cfg),
        "sliding_window": cfg.sliding_window,
    }  # fmt: skip


def from_hf(state_dict: dict[str, Tensor], cfg: GPTConfig) -> Params:
    """A gptfn tree from a ``MistralForCausalLM`` state dict."""
    return llama.from_hf(state_dict, cfg, family=NAME)


to_hf = llama.to_hf
