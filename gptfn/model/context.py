"""What every layer of one forward pass shares, built once per call: the ``Context``.

Instead of threading a dozen keywords (rotary tables, mask, cache, attention kernel, dropout,
generator, hook, name prefix) through every function, ``forward`` and generation build one
``Context`` and each layer reads what it needs. It is a ``NamedTuple``, so ``torch.compile``
traces it (and ``_replace``) without a graph break.

Hooks: ``hook(name, x) -> x`` sees and may replace a named activation. Names that cost extra
work to produce (a norm taken apart into its normalised value and its scale, the per-head
attention result, the per-head inputs, the attention pattern) are computed only when the hook
``wants`` them: a hook with a ``wants(name)`` method is asked; a plain function wants
everything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch

from gptfn.model.config import GPTConfig
from gptfn.shapes import Tensor

Hook = Callable[[str, Tensor], Tensor]
"""``hook(name, activation) -> activation``; see the module docstring and ``gptfn.research``."""

AttentionImpl = Literal["fast", "sdpa", "reference"]
"""``"fast"``: the fastest path for the case (fused SDPA, or one of gptfn's own bfloat16 CPU
paths, see :func:`gptfn.model.attend`); ``"sdpa"``: always fused SDPA (its float32 scores);
``"reference"``: the same function spelled out with an explicit mask."""


class Context(NamedTuple):
    """One forward pass's shared inputs; ``scoped`` gives a layer its name prefix, ``at`` a
    block its prefix and cache."""

    cfg: GPTConfig
    rope: tuple[Tensor, Tensor] | None = None  # rotary cos, sin [(batch) seq rot/2]
    rope_local: tuple[Tensor, Tensor] | None = None  # those of windowed layers (own base)
    mask: Tensor | None = None  # bool [batch 1 q k], True = may attend; None = causal
    window_mask: Tensor | None = None  # the mask of sliding-window layers
    caches: list[dict[str, Tensor]] | None = None  # per-layer key/value buffers (generation)
    cache: dict[str, Tensor] | None = None  # this block's buffers
    slots: Tensor | None = None  # cache slots this step writes [seq]
    attention: AttentionImpl = "fast"
    dropout: float = 0.0
    generator: torch.Generator | None = None
    hook: Hook | None = None
    prefix: str = ""

    def at(self, layer: int) -> Context:
        """The context of block ``layer``: its name prefix, its cache, its mask (the sliding
        window's on windowed layers) and its rotary tables (none where it does not rotate)."""
        cache = None if self.caches is None else self.caches[layer]
        mask, rope = self.mask, self.rope
        if self.cfg.windowed(layer):
            mask, rope = self.window_mask, self.rope_local or self.rope
        rope = rope if self.cfg.rotates(layer) else None
        return self._replace(prefix=f"blocks.{layer}.", cache=cache, mask=mask, rope=rope)

    def scoped(self, name: str) -> Context:
        """The same context with ``name`` appended to the prefix (``"attn."``, ``"ln_1."``)."""
        return self._replace(prefix=self.prefix + name)

    def tap(self, name: str, x: Tensor) -> Tensor:
        """``hook(prefix + name, x)``, or ``x`` when there is no hook."""
        return x if self.hook is None else self.hook(self.prefix + name, x)

    def wants(self, name: str) -> bool:
        """Whether the hook asks for ``prefix + name`` (for activations that cost extra)."""
        if self.hook is None:
            return False
        ask = getattr(self.hook, "wants", None)
        return True if ask is None else bool(ask(self.prefix + name))

    def drop(self, x: Tensor) -> Tensor:
        """Inverted dropout at the pass's rate, drawing from its generator (or the global RNG)."""
        if self.dropout == 0.0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.dropout
        return x * keep / (1.0 - self.dropout)
