"""``torch.compile`` as the loop and the CLI use it: one graph, a timed warm-up, a lasting cache.

:func:`jit` compiles with ``fullgraph=True`` (a graph break is an error, never a silent
fallback to eager) and static shapes, and prints how long the first call (the compilation)
took. Compiled kernels are cached on disk by inductor's FX-graph and AOTAutograd caches in
:func:`compile_cache_dir`, so a second run of the same configuration skips code generation.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_F = Callable[..., Any]


def compile_cache_dir() -> Path:
    """Where compiled kernels persist between runs: ``$TORCHINDUCTOR_CACHE_DIR`` when set, else
    ``~/.cache/gptfn/torch-compile`` (exported as that variable, which torch reads)."""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if path is None:
        path = str(Path.home() / ".cache" / "gptfn" / "torch-compile")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return Path(path)


def jit(fn: _F, name: str, report: Callable[[str], None] | None = print) -> _F:
    """``torch.compile(fn, fullgraph=True, dynamic=False)``; the first call reports its time.

    Args:
      fn: A pure function of tensors (and trees of them).
      name: What ``fn`` is, for the report ("the evaluation").
      report: Called once with a line such as "compiled the evaluation in 41.0 s (first
        call; cache ~/.cache/gptfn/torch-compile)"; None to stay quiet.

    Returns:
      The compiled function.
    """
    cache = compile_cache_dir()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    first = True

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal first
        if not first:
            return compiled(*args, **kwargs)
        start = time.perf_counter()
        out = compiled(*args, **kwargs)
        first = False
        if report is not None:
            seconds = time.perf_counter() - start
            report(f"compiled {name} in {seconds:.1f} s (first call; cache {cache})")
        return out

    return call
