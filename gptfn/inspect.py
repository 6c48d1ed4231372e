"""Looking inside the model with pure functions: capture and patch activations, logit lens.

No hook registry: ``forward``'s ``hook`` argument sees each named activation, so capturing and
patching compose with ``torch.func`` (``grad`` with respect to an additive patch is attribution
patching; ``vmap`` over a batch of patches runs them all at once).

| name | shape | TransformerLens |
| --- | --- | --- |
| ``embed`` | [batch seq d_model] | ``hook_embed`` |
| ``pos_embed`` | [batch seq d_model] | ``hook_pos_embed`` |
| ``blocks.{i}.resid_pre`` | [batch seq d_model] | ``blocks.{i}.hook_resid_pre`` |
| ``blocks.{i}.attn.q`` / ``k`` / ``v`` | [batch seq head d_head] | ``attn.hook_q`` ... |
| ``blocks.{i}.attn.scores`` | [batch head query key] | ``blocks.{i}.attn.hook_attn_scores`` |
| ``blocks.{i}.attn.pattern`` | [batch head query key] | ``blocks.{i}.attn.hook_pattern`` |
| ``blocks.{i}.attn.z`` | [batch seq head d_head] | ``blocks.{i}.attn.hook_z`` |
| ``blocks.{i}.attn.out`` | [batch seq d_model] | ``blocks.{i}.hook_attn_out`` |
| ``blocks.{i}.resid_mid`` | [batch seq d_model] | ``blocks.{i}.hook_resid_mid`` |
| ``blocks.{i}.mlp.pre`` / ``post`` | [batch seq d_mlp] | ``mlp.hook_pre`` / ``hook_post`` |
| ``blocks.{i}.mlp.out`` | [batch seq d_model] | ``blocks.{i}.hook_mlp_out`` |
| ``blocks.{i}.resid_post`` | [batch seq d_model] | ``blocks.{i}.hook_resid_post`` |
| ``ln_f.out`` | [batch seq d_model] | ``ln_final.hook_normalized`` |

``scores`` (scaled, masked, before softmax) and ``pattern`` exist only on the reference attention
path, which these functions select when such a name is asked for; otherwise the fast path runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from gptfn.model import forward, unembed
from gptfn.typing import Params

__all__ = ["activation_names", "run_with_cache", "run_with_patches", "logit_lens"]

_BLOCK_NAMES = [
    "resid_pre",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.scores",
    "attn.pattern",
    "attn.z",
    "attn.out",
    "resid_mid",
    "mlp.pre",
    "mlp.post",
    "mlp.out",
    "resid_post",
]
_NEEDS_REFERENCE = ("attn.scores", "attn.pattern")


def activation_names(params: Params) -> list[str]:
    """Every activation name of this model, in the order they are computed."""
    names = ["embed", "pos_embed"]
    for i in range(len(params["blocks"])):
        names += [f"blocks.{i}.{n}" for n in _BLOCK_NAMES]
    return [*names, "ln_f.out"]


def _resolve(params: Params, names: Iterable[str]) -> set[str]:
    valid = activation_names(params)
    unknown = sorted(set(names) - set(valid))
    if unknown:
        raise KeyError(f"unknown activation names {unknown}; valid names are: {', '.join(valid)}")
    return set(names)


def _attention_for(names: Iterable[str], forward_kwargs: dict[str, Any]) -> dict[str, Any]:
    if any(n.endswith(_NEEDS_REFERENCE) for n in names):
        return {**forward_kwargs, "attention": "reference"}
    return forward_kwargs


def run_with_cache(
    params: Params,
    tokens: Tensor,
    names: Iterable[str] | Callable[[str], bool] | None = None,
    **forward_kwargs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(logits, cache)``: ``cache`` maps activation names to tensors. ``names`` (a list, or a
    predicate on the name) limits what is kept; None keeps all."""
    if names is None:
        wanted = set(activation_names(params))
    elif callable(names):
        wanted = {n for n in activation_names(params) if names(n)}
    else:
        wanted = _resolve(params, names)
    cache: dict[str, Tensor] = {}

    def hook(name: str, x: Tensor) -> Tensor:
        if name in wanted:
            cache[name] = x
        return x

    logits = forward(params, tokens, hook=hook, **_attention_for(wanted, forward_kwargs))
    return logits, cache


def run_with_patches(
    params: Params,
    tokens: Tensor,
    patches: Mapping[str, Callable[[Tensor], Tensor]],
    **forward_kwargs: Any,
) -> Tensor:
    """Logits with ``patches[name](activation)`` replacing each named activation where it is
    computed (later layers see the new value)."""
    _resolve(params, patches)

    def hook(name: str, x: Tensor) -> Tensor:
        patch = patches.get(name)
        return x if patch is None else patch(x)

    return forward(params, tokens, hook=hook, **_attention_for(patches, forward_kwargs))


def logit_lens(params: Params, cache: Mapping[str, Tensor]) -> Tensor:
    """[layer batch seq vocab]: each block's ``resid_post`` through the final norm and the
    unembedding, as if the network stopped there."""
    layers = len(params["blocks"])
    missing = [i for i in range(layers) if f"blocks.{i}.resid_post" not in cache]
    if missing:
        raise KeyError(
            f"the cache lacks blocks.{{i}}.resid_post for layers {missing}: capture them "
            "with run_with_cache(..., names=lambda n: n.endswith('resid_post'))"
        )
    return torch.stack([unembed(params, cache[f"blocks.{i}.resid_post"]) for i in range(layers)])
