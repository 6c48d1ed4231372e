"""Hugging Face model families, both ways: a config mapping and a weight converter each.

Each family module (``gpt2``, ``llama``, ``qwen2``, ``neox``, ``mistral``, ``qwen3`` ...) has
``MAPS`` (the ``GPTConfig`` fields its config.json carries), ``config_from_hf`` (a config.json
dict -> ``GPTConfig``),
``config_to_hf`` (the reverse, or a ``ValueError`` naming a mapped value it cannot hold),
``from_hf`` (state dict -> gptfn tree) and ``to_hf`` (tree -> state dict that loads with
``strict=True``). What no family has to do: refuse the fields it does not map
(``common.refuse_unmapped`` refuses, by name, every such field not at its default, including
fields added later) and check that the export wrote every leaf (``common.TrackedTree``).
Adding a family is one module and one line in ``FAMILIES``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from gptfn.families import (
    gemma2,
    gemma3,
    gpt2,
    llama,
    mistral,
    neox,
    olmo2,
    phi3,
    qwen2,
    qwen3,
    smollm3,
)
from gptfn.families.common import TrackedTree, refuse_unmapped
from gptfn.families.gpt2 import from_hf_gpt2
from gptfn.model import GPTConfig, check_params
from gptfn.shapes import Params, Tensor

__all__ = ["FAMILIES", "family", "from_hf", "hf_config", "to_hf", "from_hf_gpt2", "to_hf_gpt2"]

FAMILIES: dict[str, ModuleType] = {
    gpt2.MODEL_TYPE: gpt2,
    llama.MODEL_TYPE: llama,
    qwen2.MODEL_TYPE: qwen2,
    neox.MODEL_TYPE: neox,
    mistral.MODEL_TYPE: mistral,
    qwen3.MODEL_TYPE: qwen3,
    olmo2.MODEL_TYPE: olmo2,
    smollm3.MODEL_TYPE: smollm3,
    phi3.MODEL_TYPE: phi3,
    gemma2.MODEL_TYPE: gemma2,
    gemma3.MODEL_TYPE: gemma3,
    "gemma3": gemma3,  # multimodal folders: the text model is read, and written as gemma3_text
}
"""model_type (as in config.json) -> family module."""


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        raise TypeError(
            f"expected a config.json dict or a transformers config, got {type(config).__name__}"
        )
    return to_dict()


def family(model_type: str) -> ModuleType:
    """The family module for a config.json ``model_type``; a clear error for others."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; gptfn converts: "
            f"{', '.join(f'{k} ({m.ARCHITECTURE})' for k, m in FAMILIES.items())}"
        ) from None


def from_hf(state_dict: dict[str, Tensor], config: Any) -> Params:
    """A gptfn tree (carrying its ``GPTConfig``) from a Hugging Face causal-LM state dict and its
    config (a config.json dict or a ``transformers`` config object).

    Tensors are views of the state dict's where the layouts allow (nothing is copied or
    modified). Every key must be used: leftovers are reported as an unsupported variant.
    """
    hf = _config_dict(config)
    fam = family(hf.get("model_type", "<missing>"))
    params = fam.from_hf(state_dict, fam.config_from_hf(hf))
    check_params(params)
    return params


def _config_to_hf(fam: ModuleType, cfg: GPTConfig) -> dict[str, Any]:
    """``fam``'s config.json for ``cfg``, after refusing every field it does not map."""
    refuse_unmapped(cfg, fam.NAME, fam.MAPS)
    return fam.config_to_hf(cfg)


def _family_for(cfg: GPTConfig, model_type: str | None) -> tuple[ModuleType, dict[str, Any]]:
    if model_type is not None:
        fam = family(model_type)
        return fam, _config_to_hf(fam, cfg)
    reasons = []
    for fam in dict.fromkeys(FAMILIES.values()):
        try:
            return fam, _config_to_hf(fam, cfg)
        except ValueError as err:
            reasons.append(str(err))
    raise ValueError("no Hugging Face family fits this model: " + "; ".join(reasons))


def hf_config(params: Params, model_type: str | None = None) -> dict[str, Any]:
    """The config.json (a dict) of the Hugging Face model that holds ``params``: the first
    family that can express the tree's config, or ``model_type``."""
    return _family_for(GPTConfig.from_params(params), model_type)[1]


def to_hf(params: Params, model_type: str | None = None) -> dict[str, Tensor]:
    """The Hugging Face state dict of ``params`` (family as :func:`hf_config`); it loads into
    the matching ``*ForCausalLM`` with ``strict=True``."""
    cfg = GPTConfig.from_params(params)
    fam, _ = _family_for(cfg, model_type)
    tracked = TrackedTree(params)
    state_dict = fam.to_hf(tracked, cfg)
    if unread := tracked.unread(params):
        raise ValueError(
            f"{fam.NAME} export would drop the leaves {unread[:6]}"
            f"{' ...' if len(unread) > 6 else ''}: {fam.ARCHITECTURE} has no place for them"
        )
    return state_dict


def to_hf_gpt2(params: Params) -> dict[str, Tensor]:
    """``to_hf(params, "gpt2")``: a ``GPT2LMHeadModel`` state dict."""
    return to_hf(params, "gpt2")
