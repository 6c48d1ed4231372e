"""``torch.compile`` as the loop and the CLI use it: one graph, a timed warm-up, a lasting cache.

:func:`jit` compiles with ``fullgraph=True`` (a graph break is an error, never a silent
fallback to eager) and static shapes, and prints how long the first call (the compilation)
took. Compiled kernels are cached on disk by inductor's FX-graph and AOTAutograd caches in
:func:`compile_cache_dir`, so a second run of the same configuration skips code generation.
The compilation runs with the heap frozen (:func:`frozen_heap`): the garbage collector's full
passes skip what the process held before it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
from collections.abc import Callable, Iterator
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

    def done(seconds: float) -> None:
        if report is not None:
            report(f"compiled {name} in {seconds:.1f} s (first call; cache {cache})")

    return frozen_first_call(torch.compile(fn, fullgraph=True, dynamic=False), done)


def frozen_first_call(fn: _F, done: Callable[[float], None] | None = None) -> _F:
    """``fn`` whose first call runs in :func:`frozen_heap` and then, if given, calls ``done``
    with its seconds: :func:`jit`'s compilation, or a call that compiles more than ``jit``
    sees, such as a train step around a compiled loss, whose backward is compiled when the
    gradient is taken, after the loss has returned. A first call that raises counts as none."""
    first = True

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal first
        if not first:
            return fn(*args, **kwargs)
        start = time.perf_counter()
        with frozen_heap():
            out = fn(*args, **kwargs)
        first = False
        if done is not None:
            done(time.perf_counter() - start)
        return out

    return call


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects alive on entry out of the garbage collector's passes until exit.

    Compiling allocates a great many short-lived Python objects, and each full collection they
    trigger would scan the whole heap again (every module, function and tensor the process
    holds). ``gc.freeze`` sets those aside, so a collection scans only what the compilation
    made; ``gc.unfreeze`` on exit hands them back, so nothing is kept that would otherwise
    have been freed. Nested or inside a caller's own freeze, it does nothing.

    On nanoGPT's CPU recipe a train step's first call (compiling its loss and backward) spent
    1.1 s in collections, 0.4 s with the heap frozen (docs/benchmarks.md, issue 25)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
