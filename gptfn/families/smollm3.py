"""SmolLM3 (``SmolLM3ForCausalLM``, model_type ``smollm3``): Llama with no rotary positions on
some layers (``no_rope_layers[i] == 1`` means layer i rotates: ``rope_layers``), grouped-query
attention, tied; sliding windows where ``use_sliding_window`` and ``layer_types`` say."""

from __future__ import annotations

from typing import Any

from gptfn.families import llama
from gptfn.families.common import layer_pattern, layer_types_to_hf, require, window_from_hf
from gptfn.model import GPTConfig
from gptfn.shapes import Params, Tensor

MODEL_TYPE = "smollm3"
NAME = "SmolLM3"
MAPS = llama.MAPS | {"rope_layers", "sliding_window", "window_pattern"}
ARCHITECTURE = "SmolLM3ForCausalLM"


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from a SmolLM3 config.json."""
    n_layer, interval = hf["num_hidden_layers"], hf.get("no_rope_layer_interval", 4)
    rotates = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layer)]
    return GPTConfig(
        **llama.fields_from_hf(hf, NAME), **window_from_hf(hf, n_layer),
        rope_layers=layer_pattern([bool(r) for r in rotates], "R", "N"),
    )  # fmt: skip


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """A SmolLM3 config.json for ``cfg`` (ValueError if SmolLM3 cannot express it)."""
    require(cfg, NAME, {**llama.REQUIRED, "qkv_bias": cfg.bias})
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **llama.common_to_hf(cfg),
        "attention_bias": cfg.bias, "mlp_bias": cfg.mlp_bias,
        "no_rope_layers": [int(cfg.rotates(i)) for i in range(cfg.n_layer)],
        "use_sliding_window": cfg.sliding_window is not None,
        "sliding_window": cfg.sliding_window, "layer_types": layer_types_to_hf(cfg),
        "pad_token_id": None,  # its default (128004) would not fit a smaller vocabulary
    }  # fmt: skip


def from_hf(state_dict: dict[str, Tensor], cfg: GPTConfig) -> Params:
    """A gptfn tree from a ``SmolLM3ForCausalLM`` state dict."""
    return llama.from_hf(state_dict, cfg, family=NAME)


to_hf = llama.to_hf
