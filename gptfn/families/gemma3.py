"""Gemma 3 (``Gemma3ForCausalLM``, model_type ``gemma3_text``; and the text part of the
multimodal ``gemma3`` folders, whose weights sit under ``model.language_model.`` or, in older
files, ``language_model.model.``): Gemma 2's norms and scaling plus per-head QK-norm, no
attention soft-cap (a final logit soft-cap when the config sets one), 5 local : 1 global
layers (``layer_types`` or the older ``sliding_window_pattern``), rotary base
``rope_local_base_freq`` (10k) on local layers and ``rope_theta`` (1M, with linear scaling on
larger models) on global ones. Exported as ``gemma3_text``."""

from __future__ import annotations

from typing import Any

from gptfn.families import gemma2
from gptfn.families.common import (
    decoder_from_hf,
    decoder_to_hf,
    first,
    require,
    rope_from_hf,
    scaling_to_hf,
)
from gptfn.model import GPTConfig
from gptfn.shapes import Params, Tensor

MODEL_TYPE = "gemma3_text"
NAME = "Gemma 3"
MAPS = (gemma2.MAPS - {"attn_softcap"}) | {"qk_norm", "rope_local_theta"}
"""No attention soft-cap: Hugging Face's Gemma 3 ignores ``attn_logit_softcapping`` (5.25), so
it is read as none and a model with one is refused."""
ARCHITECTURE = "Gemma3ForCausalLM"
PREFIXES = (
    ("model.", "lm_head.weight"),
    ("model.language_model.", "lm_head.weight"),
    ("language_model.model.", "language_model.lm_head.weight"),
)
"""Where the text model's weights are: Gemma3ForCausalLM, then the multimodal layouts."""


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from a Gemma 3 config.json (the ``text_config`` of a multimodal one)."""
    hf = dict(hf.get("text_config") or hf)
    n_layer, every = hf["num_hidden_layers"], hf.get("sliding_window_pattern") or 6
    hf.setdefault("layer_types", None)
    if hf["layer_types"] is None:
        hf["layer_types"] = [
            "sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layer)
        ]
    local = (hf.get("rope_parameters") or {}).get("sliding_attention") or {}
    if first(local, "rope_type", default="default") != "default":
        raise ValueError(f"{NAME} with scaled rotary on local layers is not supported: {local}")
    fields = gemma2.gemma_fields({"rope_theta": 1e6, **hf}, NAME)
    fields |= rope_from_hf({"rope_theta": 1e6, **hf}, NAME, layer_type="full_attention")
    fields["rotary_fraction"], fields["attn_softcap"] = 1.0, None
    local_theta = first(local, "rope_theta", default=hf.get("rope_local_base_freq", 10000.0))
    windowed = fields["sliding_window"] is not None
    return GPTConfig(
        **fields, qk_norm=True, rope_local_theta=float(local_theta) if windowed else None
    )


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """A Gemma 3 (text) config.json for ``cfg`` (ValueError if Gemma 3 cannot express it)."""
    require(cfg, NAME, {**gemma2.REQUIRED, "qkv_bias": cfg.bias, "qk_norm": True})
    if cfg.rope_local_theta is None and cfg.rope_scaling is not None and cfg.sliding_window:
        raise ValueError(f"{NAME} cannot hold rope_scaling on local layers (rope_local_theta=None)")
    local = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
    rope = {
        "full_attention": scaling_to_hf(cfg.rope_scaling) | {"rope_theta": cfg.rope_theta},
        "sliding_attention": {"rope_type": "default", "rope_theta": local},
    }
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **gemma2.gemma_to_hf(cfg),
        "rope_parameters": rope, "rope_local_base_freq": local,
    }  # fmt: skip


def from_hf(state_dict: dict[str, Tensor], cfg: GPTConfig) -> Params:
    """A gptfn tree from a ``Gemma3ForCausalLM`` state dict, or the text part of a
    ``Gemma3ForConditionalGeneration`` one (its vision weights are left out)."""
    prefix, head = next(
        ((p, h) for p, h in PREFIXES if f"{p}embed_tokens.weight" in state_dict), PREFIXES[0]
    )
    text = {k: v for k, v in state_dict.items() if k.startswith(prefix) or k == head}
    return decoder_from_hf(text, cfg, NAME, gemma2.NORMS, prefix, head)


def to_hf(params: Params, cfg: GPTConfig) -> dict[str, Tensor]:
    """A ``Gemma3ForCausalLM`` state dict."""
    return decoder_to_hf(params, cfg, gemma2.NORMS)
