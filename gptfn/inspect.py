"""Looking inside the model with pure functions: capture and patch activations, logit lens.

No hook registry: ``forward``'s ``hook`` argument sees each named activation, so capturing and
patching compose with ``torch.func`` (``grad`` with respect to an additive patch is attribution
patching; ``vmap`` over a batch of patches runs them all at once).

The names are recorded from the model's own code (one forward on shape-only "meta" tensors,
cached per config), never kept by hand; docs/models.md tables every name with its shape and
its TransformerLens equivalent, and a test holds that table against this list. Names that cost
extra work (the norms taken apart, the per-head attention result and inputs, attention scores
and pattern, which need the reference attention path) are computed only when asked for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from gptfn.model import GPTConfig, config_of, forward, init, unembed
from gptfn.typing import Params

__all__ = ["activation_names", "run_with_cache", "run_with_patches", "logit_lens"]


class _Recorder:
    """A hook that asks for every name and writes down the order they come in."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, name: str, x: Tensor) -> Tensor:
        self.names.append(name)
        return x

    def wants(self, name: str) -> bool:
        return True


@functools.lru_cache(maxsize=64)
def _names_for(cfg: GPTConfig) -> tuple[str, ...]:
    recorder = _Recorder()
    tokens = torch.zeros(1, min(2, cfg.block_size), dtype=torch.long, device="meta")
    forward(init(cfg, device="meta"), tokens, hook=recorder)
    return tuple(recorder.names)


def activation_names(params: Params) -> list[str]:
    """Every activation name of this model, in the order they are computed."""
    return list(_names_for(config_of(params)))


def _resolve(params: Params, names: Iterable[str]) -> set[str]:
    valid = activation_names(params)
    unknown = sorted(set(names) - set(valid))
    if unknown:
        raise KeyError(f"unknown activation names {unknown}; valid names are: {', '.join(valid)}")
    return set(names)


class _Hook:
    """``fn`` as a hook that is only called for (and only asks for) the ``wanted`` names."""

    def __init__(self, wanted: set[str], fn: Callable[[str, Tensor], Tensor]) -> None:
        self.wanted, self.fn = wanted, fn

    def __call__(self, name: str, x: Tensor) -> Tensor:
        return self.fn(name, x) if name in self.wanted else x

    def wants(self, name: str) -> bool:
        return name in self.wanted


def run_with_cache(
    params: Params,
    tokens: Tensor,
    names: Iterable[str] | Callable[[str], bool] | None = None,
    **forward_kwargs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(logits, cache)``: ``cache`` maps activation names to tensors. ``names`` (a list, or a
    predicate on the name) limits what is kept (and computed); None keeps all."""
    if names is None:
        wanted = set(activation_names(params))
    elif callable(names):
        wanted = {n for n in activation_names(params) if names(n)}
    else:
        wanted = _resolve(params, names)
    cache: dict[str, Tensor] = {}

    def keep(name: str, x: Tensor) -> Tensor:
        cache[name] = x
        return x

    logits = forward(params, tokens, hook=_Hook(wanted, keep), **forward_kwargs)
    return logits, cache


def run_with_patches(
    params: Params,
    tokens: Tensor,
    patches: Mapping[str, Callable[[Tensor], Tensor]],
    **forward_kwargs: Any,
) -> Tensor:
    """Logits with ``patches[name](activation)`` replacing each named activation where it is
    computed (later layers see the new value)."""
    wanted = _resolve(params, patches)
    hook = _Hook(wanted, lambda name, x: patches[name](x))
    return forward(params, tokens, hook=hook, **forward_kwargs)


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
