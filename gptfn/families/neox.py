"""GPT-NeoX / Pythia (``GPTNeoXForCausalLM``, model_type ``gpt_neox``).

Parallel residual (``x + attn(ln_1 x) + mlp(ln_2 x)``), rotary positions on a fraction of each
head's dims (``rotary_pct``, 0.25 for Pythia), LayerNorm with bias, exact GELU, untied
unembedding (``embed_out``). q, k, v are fused per head: ``query_key_value`` rows are laid out
[head, (q k v), d_head]. Hugging Face always stores the MLP and norm biases: a gptfn model
without them is written with zeros (the same function).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange

from gptfn.families.common import (
    Reader,
    activation,
    norm_in,
    norm_out,
    require,
    rope_from_hf,
    rope_to_hf,
)
from gptfn.model import GPTConfig
from gptfn.shapes import Params, Tensor

MODEL_TYPE = "gpt_neox"
NAME = "GPT-NeoX"
MAPS = frozenset({
    "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "d_mlp", "position", "rope_theta",
    "rotary_fraction", "norm", "norm_eps", "norm_bias", "mlp", "mlp_bias", "bias", "qkv_bias",
    "parallel_residual", "tie_embeddings",
})  # fmt: skip
"""The GPTConfig fields a GPT-NeoX config.json carries (absent norm and MLP biases are written
as zeros)."""
ARCHITECTURE = "GPTNeoXForCausalLM"
FILE_NAMES = {"lm_head.weight": "embed_out.weight"}
"""Keys written under their older names in model.safetensors (what Pythia's files use; every
transformers version reads them)."""
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from a GPT-NeoX config.json."""
    bias = bool(hf.get("attention_bias", True))
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        d_mlp=hf["intermediate_size"],
        position="rotary",
        **rope_from_hf(
            hf,
            "GPT-NeoX",
            theta_keys=("rotary_emb_base", "rope_theta"),
            fraction_keys=("rotary_pct", "partial_rotary_factor"),
            default_fraction=0.25,
        ),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        norm_bias=True,
        mlp=activation(hf.get("hidden_act", "gelu"), _ACTIVATIONS, "GPT-NeoX"),
        mlp_bias=True,
        bias=bias,
        qkv_bias=bias,
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """A GPT-NeoX config.json for ``cfg`` (ValueError if GPT-NeoX cannot express it)."""
    require(
        cfg, NAME,
        {"position": "rotary", "norm": "layernorm", "mlp": ("gelu", "gelu_tanh"),
         "qkv_bias": cfg.bias},
    )  # fmt: skip
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE],
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.d_mlp,
        "hidden_act": "gelu" if cfg.mlp == "gelu" else "gelu_new",
        "layer_norm_eps": cfg.norm_eps, "use_parallel_residual": cfg.parallel_residual,
        "attention_bias": cfg.bias, "tie_word_embeddings": cfg.tie_embeddings,
        "rotary_emb_base": cfg.rope_theta, **rope_to_hf(cfg, fraction_key="rotary_pct"),
        "attention_dropout": 0.0, "hidden_dropout": 0.0,
    }  # fmt: skip


def from_hf(state_dict: dict[str, Tensor], cfg: GPTConfig) -> Params:
    """A gptfn tree from a ``GPTNeoXForCausalLM`` state dict."""
    sd = Reader(state_dict, "GPT-NeoX")
    h = cfg.n_head
    blocks = []
    for i in range(cfg.n_layer):
        pre = f"gpt_neox.layers.{i}"
        qkv = sd.take(f"{pre}.attention.query_key_value.weight")
        w_q, w_k, w_v = rearrange(qkv, "(h three k) d -> three d h k", h=h, three=3)
        attn = {"w_q": w_q, "w_k": w_k, "w_v": w_v}
        attn["w_o"] = rearrange(sd.take(f"{pre}.attention.dense.weight"), "d (h k) -> h k d", h=h)
        if cfg.bias:
            b_qkv = sd.take(f"{pre}.attention.query_key_value.bias")
            b_q, b_k, b_v = rearrange(b_qkv, "(h three k) -> three h k", h=h, three=3)
            attn |= {"b_q": b_q, "b_k": b_k, "b_v": b_v}
            attn["b_o"] = sd.take(f"{pre}.attention.dense.bias")
        mlp = {
            "w_in": sd.take(f"{pre}.mlp.dense_h_to_4h.weight").T,
            "b_in": sd.take(f"{pre}.mlp.dense_h_to_4h.bias"),
            "w_out": sd.take(f"{pre}.mlp.dense_4h_to_h.weight").T,
            "b_out": sd.take(f"{pre}.mlp.dense_4h_to_h.bias"),
        }
        blocks.append(
            {"ln_1": norm_in(sd, f"{pre}.input_layernorm", True), "attn": attn,
             "ln_2": norm_in(sd, f"{pre}.post_attention_layernorm", True), "mlp": mlp}
        )  # fmt: skip
    params: Params = {
        "wte": sd.take("gpt_neox.embed_in.weight"), "blocks": blocks,
        "ln_f": norm_in(sd, "gpt_neox.final_layer_norm", True), "config": cfg,
    }  # fmt: skip
    if not cfg.tie_embeddings:  # transformers 5 calls it lm_head; files on the hub embed_out
        params["unembed"] = sd.take(
            "lm_head.weight" if "lm_head.weight" in sd else "embed_out.weight"
        )
    sd.finish(ignore=["lm_head.weight", "embed_out.weight"])
    return params


def to_hf(params: Params, cfg: GPTConfig) -> dict[str, Tensor]:
    """A ``GPTNeoXForCausalLM`` state dict (loads with ``strict=True``)."""
    sd: dict[str, Tensor] = {"gpt_neox.embed_in.weight": params["wte"]}
    zeros = params["wte"].new_zeros
    for i, block in enumerate(params["blocks"]):
        pre = f"gpt_neox.layers.{i}"
        attn, mlp = block["attn"], block["mlp"]
        qkv = torch.stack([attn["w_q"], attn["w_k"], attn["w_v"]])
        sd[f"{pre}.attention.query_key_value.weight"] = rearrange(
            qkv, "three d h k -> (h three k) d"
        )
        sd[f"{pre}.attention.dense.weight"] = rearrange(attn["w_o"], "h k d -> d (h k)")
        if cfg.bias:
            b_qkv = torch.stack([attn["b_q"], attn["b_k"], attn["b_v"]])
            sd[f"{pre}.attention.query_key_value.bias"] = rearrange(
                b_qkv, "three h k -> (h three k)"
            )
            sd[f"{pre}.attention.dense.bias"] = attn["b_o"]
        sd[f"{pre}.mlp.dense_h_to_4h.weight"] = mlp["w_in"].T
        sd[f"{pre}.mlp.dense_h_to_4h.bias"] = mlp.get("b_in", zeros(cfg.d_mlp))
        sd[f"{pre}.mlp.dense_4h_to_h.weight"] = mlp["w_out"].T
        sd[f"{pre}.mlp.dense_4h_to_h.bias"] = mlp.get("b_out", zeros(cfg.n_embd))
        sd |= norm_out(block["ln_1"], f"{pre}.input_layernorm", bias=True)
        sd |= norm_out(block["ln_2"], f"{pre}.post_attention_layernorm", bias=True)
    sd |= norm_out(params["ln_f"], "gpt_neox.final_layer_norm", bias=True)
    sd["lm_head.weight"] = params.get("unembed", params["wte"])
    return sd
