"""Shape aliases and the one switch for run-time shape checking.

Two functions are wrapped with :func:`checked`, the model's entry points ``gptfn.model.forward``
and ``gptfn.model.loss``: jaxtyping + beartype check their arguments on every call unless
checking is switched off (``gptfn.set_runtime_checks(False)`` or ``GPTFN_CHECKS=0``) or the call
is being traced by ``torch.compile`` (jaxtyping cannot check fake tensors). Everything else
(the layers, generation's decode step, the optimizers) carries the same annotations for the
reader but is not checked, so hot loops pay nothing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from beartype import beartype
from jaxtyping import Float as Float
from jaxtyping import Int as Int
from jaxtyping import jaxtyped
from torch import Tensor as Tensor

Params = dict[str, Any]
"""A parameter tree: nested dicts (and lists of blocks) whose leaves are tensors."""

_F = TypeVar("_F", bound=Callable[..., Any])
_CHECKS = os.environ.get("GPTFN_CHECKS", "1") not in ("0", "false", "False", "")


def set_runtime_checks(enabled: bool) -> bool:
    """Turn jaxtyping/beartype checks of public functions on or off; returns the previous value."""
    global _CHECKS
    previous, _CHECKS = _CHECKS, bool(enabled)
    return previous


def runtime_checks_enabled() -> bool:
    """Whether public functions currently check their argument shapes and values."""
    return _CHECKS and not torch.compiler.is_compiling()


def checked(fn: _F) -> _F:
    """Check ``fn``'s jaxtyping annotations with beartype on each call while checks are on."""
    typed = jaxtyped(typechecker=beartype)(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _CHECKS and not torch.compiler.is_compiling():
            return typed(*args, **kwargs)
        return fn(*args, **kwargs)

    # a code object of its own: torch.compile caches graphs (and counts recompiles, 8 at most)
    # per code object, and one shared by every checked function (forward, loss, ...) made a
    # session compiling a few models hit that limit
    wrapper.__code__ = wrapper.__code__.replace(co_name=fn.__name__)
    wrapper.__gptfn_checked__ = True  # type: ignore[attr-defined]  # found by tests/test_typing.py
    return wrapper  # type: ignore[return-value]
