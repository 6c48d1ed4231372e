"""User optimizers named by import path: ``--optimizer mypkg.mymodule:make_tx``.

The function is imported from the Python path (or the current directory) and called as
``make_tx(schedule, **options)``: ``schedule`` is the run's learning rate (warm-up, then the
run's decay from ``lr`` to ``min_lr``: cosine, or ``--schedule wsd``), a function of the 0-d
step count that every gptfn transform taking a learning rate accepts; ``options`` are those of
the optimizer settings (``lr``, ``min_lr``, ``warmup_steps``, ``weight_decay``, ``beta1``,
``beta2``, ``momentum``, ``muon_lr``, ``muon_momentum``, ``muon_momentum_warmup``,
``grad_clip``) and ``total_steps`` that its signature names by keyword (all of them if it
takes ``**kwargs``). It returns a :class:`GradientTransformation`; gptfn clips the gradients
before it (``grad_clip``) as for a built-in optimizer. Every problem is a ``ValueError``
saying what is wrong with the spec.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from gptfn.optim.base import GradientTransformation, Schedule

_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
SPEC = re.compile(rf"({_NAME}):({_NAME})")
FORM = "module.path:function (e.g. mypkg.mymodule:make_tx)"


def is_user_optimizer(name: str) -> bool:
    """Whether an ``--optimizer`` value names a user optimizer (it has a ``:``)."""
    return ":" in name


def _import(module_name: str) -> Any:
    """Import ``module_name``, from the current directory too (as ``python -m`` would)."""
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.append(here)
    importlib.invalidate_caches()  # a module written after start-up is found
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r}: {err}") from None
    except Exception as err:  # the user's module raised while importing
        raise ValueError(
            f"importing module {module_name!r} failed: {type(err).__name__}: {err}"
        ) from None
    finally:
        if added:
            sys.path.remove(here)


def load_user_optimizer(spec: str) -> Callable[..., Any]:
    """The function ``spec`` (``module.path:function``) names, imported.

    Args:
      spec: ``module.path:function``; the part after ``:`` may be dotted (``Class.method``).

    Returns:
      The callable.

    Raises:
      ValueError: the spec is malformed, the module cannot be imported, it has no such
        attribute, or the attribute is not callable.
    """
    match = SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"a user optimizer is written {FORM}")
    module_name, attr = match.groups()
    found: Any = _import(module_name)
    for part in attr.split("."):
        if not hasattr(found, part):
            where = getattr(sys.modules[module_name], "__file__", None) or module_name
            raise ValueError(f"module {module_name!r} ({where}) has no attribute {attr!r}")
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"{attr} in module {module_name!r} is a {type(found).__name__}, not a "
                         "function returning a GradientTransformation")  # fmt: skip
    return found


def _keywords(factory: Callable[..., Any], options: dict[str, Any], spec: str) -> dict[str, Any]:
    """The ``options`` that ``factory``'s signature takes by keyword (besides its first)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: the schedule alone
        return {}
    parameters = list(signature.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return dict(options)
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    first = positional[0].name if positional else None
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    keywords = {k: v for k, v in options.items() if k in named and k != first}
    try:
        signature.bind(None, **keywords)
    except TypeError as err:
        raise ValueError(
            f"{spec} cannot be called as {spec.split(':')[1]}(schedule, **options): {err} (it "
            f"gets the learning-rate schedule first, then by keyword any of {', '.join(options)})"
        ) from None
    return keywords


def user_optimizer(
    spec: str, schedule: Schedule, options: dict[str, Any]
) -> GradientTransformation:
    """Import ``spec`` and call it with ``schedule`` and the ``options`` it names.

    Args:
      spec: ``module.path:function``.
      schedule: the learning rate, a function of the step count.
      options: keyword arguments it may take (the run's optimizer settings, ``total_steps``).

    Returns:
      The ``GradientTransformation`` it returns (an object with callable ``init`` and ``update``
      attributes, an optax-style one, is accepted and converted).

    Raises:
      ValueError: as :func:`load_user_optimizer`, or it cannot take these arguments, or it does
        not return a GradientTransformation.
    """
    factory = load_user_optimizer(spec)
    tx = factory(schedule, **_keywords(factory, options, spec))
    if isinstance(tx, GradientTransformation):
        return tx
    if callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None)):
        return GradientTransformation(tx.init, tx.update)
    raise ValueError(
        f"{spec} returned a {type(tx).__name__}, not a GradientTransformation (init(params) -> "
        "state and update(updates, state, params) -> (updates, state))"
    )
