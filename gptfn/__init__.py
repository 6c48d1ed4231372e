"""gptfn: a GPT written the JAX way on PyTorch — pytree parameters, pure-function layers.

``import gptfn`` imports every public subpackage, so ``gptfn.optim``, ``gptfn.tree``,
``gptfn.data``, ``gptfn.inspect``, ``gptfn.curvature``, ``gptfn.evaluate``, ``gptfn.checkpoint``,
``gptfn.families``, ``gptfn.generation``, ``gptfn.pretrained``, ... work without an import of
their own, and re-exports the names most code needs (below, in ``__all__``). ``gptfn.testing``
is the exception: it imports ``hypothesis``, a dev extra, so it is loaded on first access (a
module ``__getattr__``), not by ``import gptfn``; without hypothesis installed that access
raises an ``ImportError`` that says what to install.
The CLI (``gptfn.cli``, ``gptfn.cli_models``) sits above the library and is not imported here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from gptfn import (
    checkpoint,
    compiling,
    curvature,
    data,
    distributed,
    evaluate,
    families,
    files,
    generation,
    inspect,
    model,
    module,
    optim,
    plot,
    pretrained,
    remat,
    tracing,
    train,
    transforms,
    tree,
    typing,
)
from gptfn.checkpoint import load_run
from gptfn.curvature import hutchinson_trace, hvp, top_hessian_eigenvalues
from gptfn.families import from_hf, from_hf_gpt2, to_hf, to_hf_gpt2
from gptfn.generation import generate, generate_stream
from gptfn.inspect import activation_names, logit_lens, run_with_cache, run_with_patches
from gptfn.model import GPTConfig, forward, init, loss
from gptfn.module import GPTModule
from gptfn.pretrained import load_pretrained, save_pretrained
from gptfn.train import make_train_step
from gptfn.transforms import per_example_grads
from gptfn.typing import runtime_checks_enabled, set_runtime_checks

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
    # hypothesis)
    "checkpoint",
    "curvature",
    "data",
    "distributed",
    "evaluate",
    "families",
    "files",
    "generation",
    "inspect",
    "compiling",
    "model",
    "module",
    "optim",
    "plot",
    "pretrained",
    "remat",
    "tracing",
    "train",
    "transforms",
    "tree",
    "typing",
]
__version__ = "0.1.0"

_LAZY = {"testing": "hypothesis"}  # subpackage -> the optional dependency it imports


def __getattr__(name: str) -> ModuleType:
    """Load ``gptfn.testing`` on first access (``import gptfn`` does not import hypothesis)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'gptfn' has no attribute {name!r}")
    try:
        return importlib.import_module(f"gptfn.{name}")
    except ModuleNotFoundError as error:
        if error.name != _LAZY[name]:
            raise
        raise ImportError(
            f"gptfn.{name} needs {_LAZY[name]!r}, a dev extra: pip install 'gptfn[dev]' "
            f"(or pip install {_LAZY[name]})"
        ) from error


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
