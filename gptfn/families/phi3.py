"""Phi-3 / Phi-4-mini (``Phi3ForCausalLM``, model_type ``phi3``): Llama with queries, keys and
values fused in one ``qkv_proj`` and gate and up in one ``gate_up_proj`` (split on load, fused
on save), a sliding window on every layer when set, ``longrope`` scaling, partial rotary
(0.75 on Phi-4-mini), no biases; tied on Phi-4-mini."""

from __future__ import annotations

from typing import Any

import torch

from gptfn.families import llama
from gptfn.families.common import first, require, rope_from_hf, window_from_hf
from gptfn.model import GPTConfig
from gptfn.shapes import Params, Tensor

MODEL_TYPE = "phi3"
NAME = "Phi-3"
MAPS = llama.MAPS | {"sliding_window"}
ARCHITECTURE = "Phi3ForCausalLM"
FUSED = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
}


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from a Phi-3 config.json (either rope layout; ``type: longrope`` or ``su``)."""
    scaling = dict(hf.get("rope_scaling") or {})
    if first(scaling, "rope_type", "type") in ("su", "yarn"):  # Phi-3's older names
        hf = {**hf, "rope_scaling": {**scaling, "type": "longrope", "rope_type": "longrope"}}
    fields = llama.fields_from_hf({**hf, "attention_bias": False, "mlp_bias": False}, NAME)
    fields |= rope_from_hf(hf, NAME) | window_from_hf(hf, hf["num_hidden_layers"])
    return GPTConfig(**fields)


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """A Phi-3 config.json for ``cfg`` (ValueError if Phi-3 cannot express it)."""
    require(
        cfg, NAME,
        {**llama.REQUIRED, "rotary_fraction": cfg.rotary_fraction, "mlp": "swiglu", "bias": False,
         "qkv_bias": False, "mlp_bias": False, "d_head": cfg.n_embd // cfg.n_head},
    )  # fmt: skip
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind != "longrope":
        raise ValueError(
            f"{NAME} cannot hold rope_scaling={cfg.rope_scaling.kind!r} (longrope only)"
        )
    out = llama.common_to_hf(cfg)
    context = cfg.block_size if cfg.rope_scaling is None else cfg.rope_scaling.original_context
    out["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_fraction
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **out,
        "partial_rotary_factor": cfg.rotary_fraction, "sliding_window": cfg.sliding_window,
        "original_max_position_embeddings": context, "pad_token_id": None,
    }  # fmt: skip


def from_hf(state_dict: dict[str, Tensor], cfg: GPTConfig) -> Params:
    """A gptfn tree from a ``Phi3ForCausalLM`` state dict (fused projections split: views)."""
    sd = dict(state_dict)
    widths = {"self_attn.qkv_proj": [cfg.n_head * cfg.d_head] + [cfg.n_kv_head * cfg.d_head] * 2,
              "mlp.gate_up_proj": [cfg.d_mlp] * 2}  # fmt: skip
    for i in range(cfg.n_layer):
        for fused, parts in FUSED.items():
            key, where = f"model.layers.{i}.{fused}.weight", fused.split(".")[0]
            if key in sd:
                pieces = sd.pop(key).split(widths[fused])
                sd |= {f"model.layers.{i}.{where}.{p}.weight": w for p, w in zip(parts, pieces)}
    return llama.from_hf(sd, cfg, family=NAME)


def to_hf(params: Params, cfg: GPTConfig) -> dict[str, Tensor]:
    """A ``Phi3ForCausalLM`` state dict (projections fused)."""
    sd = llama.to_hf(params, cfg)
    for i in range(cfg.n_layer):
        for fused, parts in FUSED.items():
            where = fused.split(".")[0]
            pieces = [sd.pop(f"model.layers.{i}.{where}.{p}.weight") for p in parts]
            sd[f"model.layers.{i}.{fused}.weight"] = torch.cat(pieces)
    return sd
