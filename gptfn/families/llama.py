"""Llama (``LlamaForCausalLM``, model_type ``llama``): SmolLM2, TinyLlama, Llama-2/3 shapes.

Rotary positions, RMSNorm without bias, SwiGLU MLP, grouped-query attention, biases only when
``attention_bias`` / ``mlp_bias`` say so, tied or untied unembedding. The weights are
``nn.Linear`` [out, in]; gptfn's per-head trees are views of them.
"""

from __future__ import annotations

from typing import Any

from einops import rearrange

from gptfn.families.common import (
    Reader,
    activation,
    first,
    heads_in,
    heads_out,
    norm_in,
    norm_out,
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


def config_from_hf(hf: dict[str, Any], family: str = "Llama") -> GPTConfig:
    """GPTConfig from a Llama config.json."""
    n_head = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    rope = rope_from_hf(hf, family)
    rope["rotary_fraction"] = 1.0  # Llama rotates every dim of each head
    return GPTConfig(
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
        mlp=activation(hf.get("hidden_act", "silu"), ACTIVATIONS, family),
        bias=bias,
        qkv_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """A Llama config.json for ``cfg`` (ValueError if Llama cannot express it)."""
    require(
        cfg, NAME,
        {"position": "rotary", "rotary_fraction": 1.0, "norm": "rmsnorm", "norm_bias": False,
         "mlp": ("swiglu", "geglu"), "qkv_bias": cfg.bias},
    )  # fmt: skip
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **_common_to_hf(cfg),
        "attention_bias": cfg.bias, "mlp_bias": cfg.mlp_bias,
    }  # fmt: skip


def _common_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """The config.json keys Llama and Qwen2 share."""
    return {
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.d_head, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.d_mlp, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu" if cfg.mlp == "swiglu" else "gelu_pytorch_tanh",
        "tie_word_embeddings": cfg.tie_embeddings, **rope_to_hf(cfg),
    }  # fmt: skip


def from_hf(state_dict: dict[str, Tensor], cfg: GPTConfig, family: str = "Llama") -> Params:
    """A gptfn tree from a ``LlamaForCausalLM`` (or Qwen2) state dict."""
    sd = Reader(state_dict, family)
    h, g = cfg.n_head, cfg.n_kv_head
    blocks = []
    for i in range(cfg.n_layer):
        pre = f"model.layers.{i}"
        attn = {
            f"w_{n}": heads_in(sd.take(f"{pre}.self_attn.{n}_proj.weight"), h if n == "q" else g)
            for n in "qkv"
        }
        attn["w_o"] = rearrange(sd.take(f"{pre}.self_attn.o_proj.weight"), "d (h k) -> h k d", h=h)
        if cfg.qkv_bias:
            for n in "qkv":
                attn[f"b_{n}"] = sd.take(f"{pre}.self_attn.{n}_proj.bias").unflatten(
                    0, (-1, cfg.d_head)
                )
        if cfg.bias:
            attn["b_o"] = sd.take(f"{pre}.self_attn.o_proj.bias")
        mlp = {
            "w_gate": sd.take(f"{pre}.mlp.gate_proj.weight").T,
            "w_in": sd.take(f"{pre}.mlp.up_proj.weight").T,
            "w_out": sd.take(f"{pre}.mlp.down_proj.weight").T,
        }
        if cfg.mlp_bias:
            mlp |= {
                "b_gate": sd.take(f"{pre}.mlp.gate_proj.bias"),
                "b_in": sd.take(f"{pre}.mlp.up_proj.bias"),
                "b_out": sd.take(f"{pre}.mlp.down_proj.bias"),
            }
        blocks.append(
            {"ln_1": norm_in(sd, f"{pre}.input_layernorm", False), "attn": attn,
             "ln_2": norm_in(sd, f"{pre}.post_attention_layernorm", False), "mlp": mlp}
        )  # fmt: skip
    params: Params = {
        "wte": sd.take("model.embed_tokens.weight"), "blocks": blocks,
        "ln_f": norm_in(sd, "model.norm", False), "config": cfg,
    }  # fmt: skip
    if not cfg.tie_embeddings:
        params["unembed"] = sd.take("lm_head.weight")
    sd.finish(ignore=["lm_head.weight"])
    return params


def to_hf(params: Params, cfg: GPTConfig) -> dict[str, Tensor]:
    """A ``LlamaForCausalLM`` (or Qwen2) state dict (loads with ``strict=True``)."""
    sd: dict[str, Tensor] = {"model.embed_tokens.weight": params["wte"]}
    for i, block in enumerate(params["blocks"]):
        pre = f"model.layers.{i}"
        attn, mlp = block["attn"], block["mlp"]
        for n in "qkv":
            sd[f"{pre}.self_attn.{n}_proj.weight"] = heads_out(attn[f"w_{n}"])
            if f"b_{n}" in attn:
                sd[f"{pre}.self_attn.{n}_proj.bias"] = attn[f"b_{n}"].flatten()
        sd[f"{pre}.self_attn.o_proj.weight"] = attn["w_o"].flatten(0, 1).T
        if "b_o" in attn:
            sd[f"{pre}.self_attn.o_proj.bias"] = attn["b_o"]
        for ours, theirs in (("gate", "gate"), ("in", "up"), ("out", "down")):
            sd[f"{pre}.mlp.{theirs}_proj.weight"] = mlp[f"w_{ours}"].T
            if f"b_{ours}" in mlp:
                sd[f"{pre}.mlp.{theirs}_proj.bias"] = mlp[f"b_{ours}"]
        sd |= norm_out(block["ln_1"], f"{pre}.input_layernorm")
        sd |= norm_out(block["ln_2"], f"{pre}.post_attention_layernorm")
    sd |= norm_out(params["ln_f"], "model.norm")
    sd["lm_head.weight"] = params.get("unembed", params["wte"])
    return sd
