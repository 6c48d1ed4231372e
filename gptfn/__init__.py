"""gptfn: a GPT written the JAX way on PyTorch — pytree parameters, pure-function layers.

``import gptfn`` imports every public subpackage, so ``gptfn.model``, ``gptfn.optim``,
``gptfn.tree``, ``gptfn.data``, ``gptfn.research``, ``gptfn.train``, ``gptfn.evaluate``,
``gptfn.checkpoint``, ``gptfn.families``, ``gptfn.generation``, ``gptfn.pretrained``, ... work
without an import of their own, and re-exports the names most code needs (below, in
``__all__``). ``gptfn.testing`` and ``gptfn.lm_eval`` are the exceptions: they import an
optional dependency (``hypothesis``, ``lm-eval``), so they are loaded on first access (a module
``__getattr__``), not by ``import gptfn``; without it that access raises an ``ImportError``
that says what to install. The CLI
(``gptfn.cli``) sits above the library and is not imported here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from gptfn import (
    checkpoint,
    compiling,
    data,
    distributed,
    evaluate,
    families,
    files,
    generation,
    lora,
    model,
    optim,
    pretrained,
    research,
    settings,
    shapes,
    tracing,
    train,
    tree,
)
from gptfn.checkpoint import load_run
from gptfn.families import from_hf, from_hf_gpt2, to_hf, to_hf_gpt2
from gptfn.generation import generate, generate_stream
from gptfn.model import GPTConfig, forward, init, loss
from gptfn.pretrained import load_pretrained, save_pretrained
from gptfn.research import (
    GPTModule,
    activation_names,
    hutchinson_trace,
    hvp,
    logit_lens,
    per_example_grads,
    run_with_cache,
    run_with_patches,
    top_hessian_eigenvalues,
)
from gptfn.shapes import runtime_checks_enabled, set_runtime_checks
from gptfn.train import make_train_step

__all__ = [
    # the model
    "GPTConfig",
    "forward",
    "init",
    "loss",
    # training, checkpoints, generation, pretrained models
    "generate",
    "generate_stream",
    "load_run",
    "make_train_step",
    "load_pretrained",
    "save_pretrained",
    "from_hf",
    "to_hf",
    "from_hf_gpt2",
    "to_hf_gpt2",
    # research entry points
    "GPTModule",
    "activation_names",
    "hutchinson_trace",
    "hvp",
    "logit_lens",
    "per_example_grads",
    "run_with_cache",
    "run_with_patches",
    "top_hessian_eigenvalues",
    # run-time shape checks
    "runtime_checks_enabled",
    "set_runtime_checks",
    # subpackages (``testing`` is loaded lazily and left out so ``import *`` never needs
    # hypothesis; ``cli`` sits above the library and is not imported)
    "checkpoint",
    "compiling",
    "data",
    "distributed",
    "evaluate",
    "families",
    "files",
    "generation",
    "lora",
    "model",
    "optim",
    "pretrained",
    "research",
    "settings",
    "shapes",
    "tracing",
    "train",
    "tree",
]
__version__ = "0.1.0"

_LAZY = {  # module -> (the optional dependency it imports, the extra that installs it)
    "testing": ("hypothesis", "dev"),
    "lm_eval": ("lm_eval", "eval"),
}


def __getattr__(name: str) -> ModuleType:
    """Load ``gptfn.testing`` and ``gptfn.lm_eval`` on first access (``import gptfn`` imports
    neither hypothesis nor lm-eval)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'gptfn' has no attribute {name!r}")
    try:
        return importlib.import_module(f"gptfn.{name}")
    except ModuleNotFoundError as error:
        needs, extra = _LAZY[name]
        if error.name != needs:
            raise
        raise ImportError(
            f"gptfn.{name} needs {needs!r}, an extra: pip install 'gptfn[{extra}]' "
            f"(or pip install {needs.replace('_', '-')})"
        ) from error


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
