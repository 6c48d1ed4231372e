"""GPT-2 (``GPT2LMHeadModel``, model_type ``gpt2``).

GPT-2 stores its linear layers as ``Conv1D`` with weights laid out (in, out), the same
orientation as gptfn's ``x @ w``, and fuses q, k, v into one ``c_attn`` of width 3·d. Converting
is pure reshaping. Hugging Face's GPT-2 always has biases: a bias-free gptfn model is written
with zero biases (the same function).
"""

from __future__ import annotations

from typing import Any

from einops import rearrange

from gptfn.families.common import Reader, activation, first, norm_in, norm_out, require
from gptfn.model import GPTConfig
from gptfn.shapes import Params, Tensor

MODEL_TYPE = "gpt2"
NAME = "GPT-2"
MAPS = frozenset({
    "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "d_mlp", "mlp", "norm_eps",
    "tie_embeddings", "bias", "norm_bias", "mlp_bias", "qkv_bias",
})  # fmt: skip
"""The GPTConfig fields a GPT-2 config.json carries (absent biases are written as zeros)."""
ARCHITECTURE = "GPT2LMHeadModel"
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """GPTConfig from a GPT-2 config.json."""
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("GPT-2 with non-standard attention scaling is not supported")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        block_size=first(hf, "n_positions", "n_ctx"),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        d_mlp=hf.get("n_inner"),
        mlp=activation(hf.get("activation_function", "gelu_new"), _ACTIVATIONS, "GPT-2"),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """A GPT-2 config.json for ``cfg`` (ValueError if GPT-2 cannot express it)."""
    require(cfg, NAME, {"mlp": ("gelu_tanh", "gelu")})
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_inner": cfg.d_mlp,
        "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }  # fmt: skip


def from_hf(state_dict: dict[str, Tensor], cfg: GPTConfig) -> Params:
    """A gptfn tree from a ``GPT2LMHeadModel`` (or ``GPT2Model``) state dict."""
    sd = Reader({k.removeprefix("transformer."): v for k, v in state_dict.items()}, "GPT-2")
    h = cfg.n_head
    blocks = []
    for i in range(cfg.n_layer):
        pre = f"h.{i}"
        w_q, w_k, w_v = rearrange(
            sd.take(f"{pre}.attn.c_attn.weight"), "d (three h k) -> three d h k", three=3, h=h
        )
        attn = {"w_q": w_q, "w_k": w_k, "w_v": w_v}
        attn["w_o"] = rearrange(sd.take(f"{pre}.attn.c_proj.weight"), "(h k) d -> h k d", h=h)
        mlp = {
            "w_in": sd.take(f"{pre}.mlp.c_fc.weight"),
            "w_out": sd.take(f"{pre}.mlp.c_proj.weight"),
        }
        if cfg.bias:
            b_q, b_k, b_v = rearrange(
                sd.take(f"{pre}.attn.c_attn.bias"), "(three h k) -> three h k", three=3, h=h
            )
            attn |= {"b_q": b_q, "b_k": b_k, "b_v": b_v, "b_o": sd.take(f"{pre}.attn.c_proj.bias")}
            mlp |= {
                "b_in": sd.take(f"{pre}.mlp.c_fc.bias"),
                "b_out": sd.take(f"{pre}.mlp.c_proj.bias"),
            }
        blocks.append(
            {"ln_1": norm_in(sd, f"{pre}.ln_1", cfg.bias), "attn": attn,
             "ln_2": norm_in(sd, f"{pre}.ln_2", cfg.bias), "mlp": mlp}
        )  # fmt: skip
    params: Params = {
        "wte": sd.take("wte.weight"), "wpe": sd.take("wpe.weight"), "blocks": blocks,
        "ln_f": norm_in(sd, "ln_f", cfg.bias), "config": cfg,
    }  # fmt: skip
    if not cfg.tie_embeddings:
        params["unembed"] = sd.take("lm_head.weight")
    sd.finish(ignore=["lm_head.weight"])
    return params


def to_hf(params: Params, cfg: GPTConfig) -> dict[str, Tensor]:
    """A ``GPT2LMHeadModel`` state dict (loads with ``strict=True``)."""
    wte = params["wte"]
    sd: dict[str, Tensor] = {"transformer.wte.weight": wte, "transformer.wpe.weight": params["wpe"]}
    for i, block in enumerate(params["blocks"]):
        pre = f"transformer.h.{i}"
        attn, mlp = block["attn"], block["mlp"]
        qkv = [attn["w_q"], attn["w_k"], attn["w_v"]]
        sd[f"{pre}.attn.c_attn.weight"] = rearrange(qkv, "three d h k -> d (three h k)")
        sd[f"{pre}.attn.c_proj.weight"] = rearrange(attn["w_o"], "h k d -> (h k) d")
        sd[f"{pre}.mlp.c_fc.weight"] = mlp["w_in"]
        sd[f"{pre}.mlp.c_proj.weight"] = mlp["w_out"]
        zeros = wte.new_zeros
        biases = [attn.get(f"b_{n}", zeros(cfg.n_head, cfg.d_head)) for n in "qkv"]
        sd[f"{pre}.attn.c_attn.bias"] = rearrange(biases, "three h k -> (three h k)")
        sd[f"{pre}.attn.c_proj.bias"] = attn.get("b_o", zeros(cfg.n_embd))
        sd[f"{pre}.mlp.c_fc.bias"] = mlp.get("b_in", zeros(cfg.d_mlp))
        sd[f"{pre}.mlp.c_proj.bias"] = mlp.get("b_out", zeros(cfg.n_embd))
        for name in ("ln_1", "ln_2"):
            sd |= norm_out(block[name], f"{pre}.{name}", bias=True)
    sd |= norm_out(params["ln_f"], "transformer.ln_f", bias=True)
    sd["lm_head.weight"] = params.get("unembed", wte)
    return sd


def from_hf_gpt2(state_dict: dict[str, Tensor], n_head: int) -> Params:
    """A gptfn tree from a ``GPT2LMHeadModel`` state dict alone (no config.json): the shapes
    give everything but the head count. Prefer ``gptfn.from_hf(state_dict, config)``."""
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    missing = [key for key in ("wte.weight", "wpe.weight", "ln_f.weight") if key not in sd]
    if missing:
        raise KeyError(f"not a GPT-2 state dict: missing {missing}")
    (vocab, d), block_size = sd["wte.weight"].shape, sd["wpe.weight"].shape[0]
    if d % n_head:
        raise ValueError(f"n_head={n_head} does not divide the embedding width {d}")
    head = state_dict.get("lm_head.weight")
    tied = head is None or (
        head.shape == sd["wte.weight"].shape
        and (
            head.data_ptr() == sd["wte.weight"].data_ptr() or bool((head == sd["wte.weight"]).all())
        )
    )
    cfg = GPTConfig(
        vocab_size=vocab,
        block_size=block_size,
        n_layer=len({k.split(".")[1] for k in sd if k.startswith("h.")}),
        n_head=n_head,
        n_embd=d,
        bias="h.0.attn.c_attn.bias" in sd,
        tie_embeddings=tied,
        d_mlp=sd["h.0.mlp.c_fc.weight"].shape[1],
    )
    return from_hf(state_dict, cfg)
