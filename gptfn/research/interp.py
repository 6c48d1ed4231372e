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

import fnmatch
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


def _check_names(
    params: Params, asked: Iterable[str], seen: Iterable[str], stop_at_layer: int | None = None
) -> None:
    """Raise KeyError for names that were asked for but that the forward never produced.

    Checked after the forward, from what it saw, so that a compiled call needs no separate
    trace of the model to learn the names."""
    unknown = sorted(set(asked) - set(seen))
    if unknown and stop_at_layer is not None and not is_compiling():
        later = [n for n in unknown if n in activation_names(params)]
        if later:
            raise KeyError(f"{later} come after stop_at_layer={stop_at_layer}: not computed")
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
    *,
    stop_at_layer: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **forward_kwargs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(logits, cache)``: ``cache`` maps activation names to tensors.

    Args:
      params, tokens: as ``gptfn.forward``.
      names: what to keep (and compute): a list of names or glob patterns
        (``"blocks.*.resid_post"``), or a predicate on the name; None keeps all. Expensive
        activations (attention patterns, the norms taken apart, per-head results) are only
        computed when asked for, so the fused attention kernel runs otherwise.
      stop_at_layer: run only the blocks before this one (as TransformerLens): the first value
        returned is then the residual stream entering block ``stop_at_layer`` [batch seq
        d_model], not logits, and nothing after it is computed.
      device, dtype: where and in what dtype the cache is kept (e.g. ``"cpu"`` for a model on a
        GPU, ``torch.bfloat16`` to halve it); each activation moves as it is produced.
      **forward_kwargs: passed to ``forward`` (``attention=``, ``dropout=`` ...).

    Works under ``torch.compile(fullgraph=True)`` with plain names or a predicate: the hook is
    plain Python that dynamo traces (glob patterns are expanded against
    :func:`activation_names` first).
    """
    wanted, exact = _wanted(params, names)
    cache: dict[str, Tensor] = {}

    def keep(name: str, x: Tensor) -> Tensor:
        cache[name] = x if device is None and dtype is None else x.to(device=device, dtype=dtype)
        return x

    hook = _Hook(wanted, keep)
    out = forward(params, tokens, hook=hook, stop_at_layer=stop_at_layer, **forward_kwargs)
    if exact is not None:
        _check_names(params, exact, cache, stop_at_layer)
    return out, cache


def _wanted(
    params: Params, names: Iterable[str] | Callable[[str], bool] | None
) -> tuple[Callable[[str], bool], list[str] | None]:
    """The predicate for ``names``, and the exact names to check afterwards (None: no check)."""
    if names is None:
        return (lambda name: True), None
    if callable(names):
        return names, None
    names = list(names)
    patterns = [n for n in names if any(c in n for c in "*?[")]
    if patterns:  # globs: the names they match, each pattern matching at least one
        every = activation_names(params)
        for pattern in patterns:
            if not fnmatch.filter(every, pattern):
                raise KeyError(f"{pattern!r} matches no activation name of this model")
        chosen = {n for n in every for p in patterns if fnmatch.fnmatchcase(n, p)}
        names = [n for n in names if n not in patterns]
        chosen |= set(names)
        return (lambda name: name in chosen), names
    return (lambda name: name in names), names


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
