"""Research tools over the pure model, each a file:

- :mod:`gptfn.research.interp`: activation capture and patching (TransformerLens-style names),
  the logit lens.
- :mod:`gptfn.research.curvature`: Hessian-vector products, top eigenvalues, Hutchinson's trace.
- :mod:`gptfn.research.per_example`: per-example gradients (``vmap`` of ``grad``).
- :mod:`gptfn.research.nn_module`: ``GPTModule``, the tree as a ``torch.nn.Module`` for code that
  wants one.
"""

from __future__ import annotations

from gptfn.research.curvature import hutchinson_trace, hvp, top_hessian_eigenvalues
from gptfn.research.interp import activation_names, logit_lens, run_with_cache, run_with_patches
from gptfn.research.nn_module import GPTModule
from gptfn.research.per_example import per_example_grads

__all__ = [
    "GPTModule",
    "activation_names",
    "hutchinson_trace",
    "hvp",
    "logit_lens",
    "per_example_grads",
    "run_with_cache",
    "run_with_patches",
    "top_hessian_eigenvalues",
]
