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

from gptfn.model import GPTConfig, forward, init, unembed
from gptfn.shapes import Params
from gptfn.tracing import is_compiling


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
    return list(_names_for(GPTConfig.from_params(params)))


def _check_names(params: Params, asked: Iterable[str], seen: Iterable[str]) -> None:
    """Raise KeyError for names that were asked for but that the forward never produced.

    Checked after the forward, from what it saw, so that a compiled call needs no separate
    trace of the model to learn the names."""
    unknown = sorted(set(asked) - set(seen))
    if unknown:
        valid = "" if is_compiling() else ", ".join(activation_names(params))
        valid = valid and f"; valid names are: {valid}"
        raise KeyError(f"unknown activation names {unknown}{valid}")


class _Hook:
    """``fn`` as a hook that is only called for (and only asks for) the names ``wanted`` accepts;
    ``seen`` records the names it was called for."""

    def __init__(self, wanted: Callable[[str], bool], fn: Callable[[str, Tensor], Tensor]) -> None:
        self.wanted, self.fn, self.seen = wanted, fn, []

    def __call__(self, name: str, x: Tensor) -> Tensor:
        if not self.wanted(name):
            return x
        self.seen.append(name)
        return self.fn(name, x)

    def wants(self, name: str) -> bool:
        return self.wanted(name)


def run_with_cache(
    params: Params,
    tokens: Tensor,
    names: Iterable[str] | Callable[[str], bool] | None = None,
    **forward_kwargs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(logits, cache)``: ``cache`` maps activation names to tensors. ``names`` (a list, or a
    predicate on the name) limits what is kept (and computed); None keeps all.

    Works under ``torch.compile(fullgraph=True)``: the hook is plain Python that dynamo traces."""
    if names is None:
        wanted: Callable[[str], bool] = lambda name: True  # noqa: E731
    elif callable(names):
        wanted = names
    else:
        names = list(names)
        wanted = lambda name: name in names  # noqa: E731
    cache: dict[str, Tensor] = {}

    def keep(name: str, x: Tensor) -> Tensor:
        cache[name] = x
        return x

    logits = forward(params, tokens, hook=_Hook(wanted, keep), **forward_kwargs)
    if isinstance(names, list):
        _check_names(params, names, cache)
    return logits, cache


def run_with_patches(
    params: Params,
    tokens: Tensor,
    patches: Mapping[str, Callable[[Tensor], Tensor]],
    **forward_kwargs: Any,
) -> Tensor:
    """Logits with ``patches[name](activation)`` replacing each named activation where it is
    computed (later layers see the new value)."""
    hook = _Hook(lambda name: name in patches, lambda name, x: patches[name](x))
    logits = forward(params, tokens, hook=hook, **forward_kwargs)
    _check_names(params, patches, hook.seen)
    return logits


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
