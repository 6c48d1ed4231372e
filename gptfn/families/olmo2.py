"""OLMo-2 (``Olmo2ForCausalLM``, model_type ``olmo2``): Llama's layout with no pre-norms, an
RMSNorm on each branch's output before the residual add (``norm_position="post"``), and an
RMSNorm over the whole query and key projections before heads split
(``qk_norm_span="projection"``)."""

from __future__ import annotations

from typing import Any

from gptfn.families import llama
from gptfn.families.common import decoder_from_hf, decoder_to_hf, require
from gptfn.model import GPTConfig
from gptfn.shapes import Params, Tensor

MODEL_TYPE = "olmo2"
NAME = "OLMo-2"
MAPS = llama.MAPS | {"qk_norm", "qk_norm_span", "norm_position"}
ARCHITECTURE = "Olmo2ForCausalLM"
NORMS = {"ln_attn_out": "post_attention_layernorm", "ln_mlp_out": "post_feedforward_layernorm"}
FIXED = {"qk_norm": True, "qk_norm_span": "projection", "norm_position": "post", "mlp_bias": False}


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from an OLMo-2 config.json."""
    return GPTConfig(**{**llama.fields_from_hf({**hf, "mlp_bias": False}, NAME), **FIXED})


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """An OLMo-2 config.json for ``cfg`` (ValueError if OLMo-2 cannot express it)."""
    require(cfg, NAME, {**llama.REQUIRED, **FIXED, "qkv_bias": cfg.bias})
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **llama.common_to_hf(cfg),
        "attention_bias": cfg.bias,
    }  # fmt: skip


def from_hf(state_dict: dict[str, Tensor], cfg: GPTConfig) -> Params:
    """A gptfn tree from an ``Olmo2ForCausalLM`` state dict."""
    return decoder_from_hf(state_dict, cfg, NAME, NORMS)


def to_hf(params: Params, cfg: GPTConfig) -> dict[str, Tensor]:
    """An ``Olmo2ForCausalLM`` state dict."""
    return decoder_to_hf(params, cfg, NORMS)
