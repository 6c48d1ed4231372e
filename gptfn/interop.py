"""Exact conversion between gptfn trees and Hugging Face ``GPT2LMHeadModel`` state dicts.

GPT-2 stores its linear layers as ``Conv1D`` with weights laid out (in, out) — the same
orientation as gptfn's ``x @ w`` — and fuses q, k, v into one ``c_attn`` of width 3·d. Converting
is therefore pure reshaping: split/merge the fused projection and the per-head axes.
"""

from __future__ import annotations

from einops import rearrange

from gptfn.typing import Params, Tensor

__all__ = ["from_hf_gpt2", "to_hf_gpt2"]

_NORMS = ("ln_1", "ln_2")


def _norm_from_hf(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    out = {"scale": sd[f"{prefix}.weight"]}
    if f"{prefix}.bias" in sd:
        out["bias"] = sd[f"{prefix}.bias"]
    return out


def _norm_to_hf(p: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    out = {f"{prefix}.weight": p["scale"]}
    if "bias" in p:
        out[f"{prefix}.bias"] = p["bias"]
    return out


def from_hf_gpt2(state_dict: dict[str, Tensor], n_head: int) -> Params:
    """A gptfn tree from a ``GPT2LMHeadModel`` (or ``GPT2Model``) state dict.

    ``n_head`` is needed because the fused ``c_attn`` weight does not record the head count.
    Tensors are reshaped views or copies of the inputs; the state dict is not modified.
    """
    sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    missing = [key for key in ("wte.weight", "wpe.weight", "ln_f.weight") if key not in sd]
    if missing:
        raise KeyError(f"not a GPT-2 state dict: missing {missing}")
    d = sd["wte.weight"].shape[1]
    if d % n_head:
        raise ValueError(f"n_head={n_head} does not divide the embedding width {d}")
    n_layer = len({key.split(".")[1] for key in sd if key.startswith("h.")})
    blocks = []
    for i in range(n_layer):
        pre = f"h.{i}"
        w_q, w_k, w_v = rearrange(
            sd[f"{pre}.attn.c_attn.weight"], "d (three h k) -> three d h k", three=3, h=n_head
        )
        attn = {
            "w_q": w_q,
            "w_k": w_k,
            "w_v": w_v,
            "w_o": rearrange(sd[f"{pre}.attn.c_proj.weight"], "(h k) d -> h k d", h=n_head),
        }
        mlp = {"w_in": sd[f"{pre}.mlp.c_fc.weight"], "w_out": sd[f"{pre}.mlp.c_proj.weight"]}
        if f"{pre}.attn.c_attn.bias" in sd:
            b_q, b_k, b_v = rearrange(
                sd[f"{pre}.attn.c_attn.bias"], "(three h k) -> three h k", three=3, h=n_head
            )
            attn |= {"b_q": b_q, "b_k": b_k, "b_v": b_v, "b_o": sd[f"{pre}.attn.c_proj.bias"]}
            mlp |= {"b_in": sd[f"{pre}.mlp.c_fc.bias"], "b_out": sd[f"{pre}.mlp.c_proj.bias"]}
        block = {"attn": attn, "mlp": mlp}
        block |= {norm: _norm_from_hf(sd, f"{pre}.{norm}") for norm in _NORMS}
        blocks.append(block)
    params: Params = {
        "wte": sd["wte.weight"],
        "wpe": sd["wpe.weight"],
        "blocks": blocks,
        "ln_f": _norm_from_hf(sd, "ln_f"),
    }
    head = state_dict.get("lm_head.weight")
    if head is not None and not _same_values(head, sd["wte.weight"]):
        params["unembed"] = head
    return params


def _same_values(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and (a.data_ptr() == b.data_ptr() or bool((a == b).all()))


def to_hf_gpt2(params: Params) -> dict[str, Tensor]:
    """A ``GPT2LMHeadModel`` state dict (loads with ``strict=True``) from a gptfn tree."""
    sd: dict[str, Tensor] = {
        "transformer.wte.weight": params["wte"],
        "transformer.wpe.weight": params["wpe"],
    }
    for i, block in enumerate(params["blocks"]):
        pre = f"transformer.h.{i}"
        attn, mlp = block["attn"], block["mlp"]
        qkv = [attn["w_q"], attn["w_k"], attn["w_v"]]
        sd[f"{pre}.attn.c_attn.weight"] = rearrange(qkv, "three d h k -> d (three h k)")
        sd[f"{pre}.attn.c_proj.weight"] = rearrange(attn["w_o"], "h k d -> (h k) d")
        sd[f"{pre}.mlp.c_fc.weight"] = mlp["w_in"]
        sd[f"{pre}.mlp.c_proj.weight"] = mlp["w_out"]
        if "b_q" in attn:
            biases = [attn["b_q"], attn["b_k"], attn["b_v"]]
            sd[f"{pre}.attn.c_attn.bias"] = rearrange(biases, "three h k -> (three h k)")
            sd[f"{pre}.attn.c_proj.bias"] = attn["b_o"]
            sd[f"{pre}.mlp.c_fc.bias"] = mlp["b_in"]
            sd[f"{pre}.mlp.c_proj.bias"] = mlp["b_out"]
        for norm in _NORMS:
            sd |= _norm_to_hf(block[norm], f"{pre}.{norm}")
    sd |= _norm_to_hf(params["ln_f"], "transformer.ln_f")
    sd["lm_head.weight"] = params.get("unembed", params["wte"])
    return sd
