"""The bridge to the module world: an ``nn.Module`` whose parameters are the tree's leaves.

``GPTModule(params)`` registers a copy of every leaf under its dotted path (``state_dict()`` keys
are exactly ``gptfn.tree.flatten(params)``'s), and its ``forward`` calls the pure
``gptfn.forward``. Code that expects a module — ``torch.optim``,
``torch.compile(module)``, DDP, ``torch.func.functional_call`` — then uses gptfn without a second
model definition.
"""

from __future__ import annotations

import functools
from typing import Any

import optree
import torch.nn as nn
from torch import Tensor

from gptfn.model import forward
from gptfn.shapes import Params
from gptfn.tree import flatten, unflatten


class GPTModule(nn.Module):
    """An ``nn.Module`` view of a gptfn parameter tree.

    The module owns copies of the leaves, as ``load_state_dict`` would make them: a
    ``torch.optim`` step on the module leaves the caller's tree as it was. ``share=True``
    registers the tree's own tensors instead (no copy, no extra memory), so every in-place
    update of the module rewrites the tree too; use it when you want exactly that.

    Args:
      params: A gptfn parameter tree (``gptfn.init``, ``load_run``, ...).
      share: Register the tree's tensors themselves instead of copies.

    Examples:
      >>> import torch, gptfn
      >>> params = gptfn.init(gptfn.GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=1,
      ...                                     n_embd=4))
      >>> module = gptfn.GPTModule(params)
      >>> with torch.no_grad():
      ...     _ = module.wte.add_(1.0)
      >>> bool(torch.equal(module.wte, params["wte"] + 1.0))  # the tree is untouched
      True
    """

    def __init__(self, params: Params, *, share: bool = False) -> None:
        super().__init__()
        self.config = params.get("config")  # the architecture: static data, not a parameter
        params = {key: value for key, value in params.items() if key != "config"}
        self._paths = list(flatten(params))
        _fill(self, params if share else optree.tree_map(lambda x: x.detach().clone(), params))

    def to_params(self) -> Params:
        """The tree of the module's current parameters (the module's tensors, not copies); under
        ``functional_call`` the substituted ones."""
        tree = unflatten({p: functools.reduce(getattr, p.split("."), self) for p in self._paths})
        return tree if self.config is None else {**tree, "config": self.config}

    def forward(self, tokens: Tensor, **kwargs: Any) -> Tensor:
        """``gptfn.forward(self.to_params(), tokens, **kwargs)``."""
        return forward(self.to_params(), tokens, **kwargs)


def _fill(module: nn.Module, tree: dict[str, Any]) -> None:
    """Register a dict's tensors as parameters and its subtrees as submodules (lists of subtrees
    as ``nn.ModuleList``, so ``module.blocks[1]`` works and paths stay ``blocks.1.*``)."""
    for key, value in tree.items():
        if isinstance(value, Tensor):
            trainable = value.is_floating_point()
            module.register_parameter(key, nn.Parameter(value, requires_grad=trainable))
        elif isinstance(value, list):
            module.add_module(key, nn.ModuleList(_filled(item) for item in value))
        else:
            module.add_module(key, _filled(value))


def _filled(tree: dict[str, Any]) -> nn.Module:
    if not isinstance(tree, dict):
        raise TypeError(f"GPTModule expects dicts and lists of dicts, found {type(tree).__name__}")
    module = nn.Module()
    _fill(module, tree)
    return module
