"""Settings as dataclass fields that carry their help line, allowed values and check.

``GPTConfig`` (the architecture) and the training run's option sections declare their fields
with :func:`option`; the CLI generates its flags from that metadata, a TOML file goes through
:func:`check_option`, and every path reports a bad value with the same :class:`OptionError`
that names the setting, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from typing import Any


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    above: float | None = None,
    below: float | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A dataclass field with one line of ``help`` and its allowed values: ``choices``, or a
    range (``low <= x``, ``above < x``, ``x < below``), or ``check(value) -> problem | None``."""
    meta = {"help": help, "choices": choices, "low": low, "above": above, "below": below}
    return dataclasses.field(default=default, metadata=meta | {"check": check})


class OptionError(ValueError):
    """A setting with a value it cannot have; ``str()`` names both and what is allowed."""

    def __init__(self, name: str, value: Any, problem: str) -> None:
        super().__init__(f"{name}: invalid value {value!r}: {problem}")
        self.name, self.value, self.problem = name, value, problem


def allowed_values(f: dataclasses.Field) -> str | None:
    """The allowed values of an :func:`option` field, in words (None: any of its type)."""
    meta = f.metadata
    if meta.get("choices"):
        return "one of " + ", ".join(meta["choices"])
    parts = [
        f"{op} {meta[key]:g}"
        for key, op in (("low", ">="), ("above", ">"), ("below", "<"))
        if meta.get(key) is not None
    ]
    return "must be " + " and ".join(parts) if parts else None


@functools.cache
def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def value_type(kind: Any) -> Any:
    """The type a field's values have: ``X`` for ``X | None``."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return next(k for k in typing.get_args(kind) if k is not type(None))
    return kind


def _coerce(kind: Any, value: Any) -> Any:
    """``value`` as ``kind`` (int, float, str, bool, a fixed tuple of those, a class with a
    ``from_value`` constructor, or X | None), or raise TypeError."""
    if value is None and value_type(kind) is not kind:
        return None
    kind = value_type(kind)
    if hasattr(kind, "from_value"):  # a structured value (``GPTConfig.rope_scaling``)
        return kind.from_value(value)
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if not isinstance(value, (tuple, list)) or len(value) != len(items):
            names = ", ".join(k.__name__ for k in items)
            raise TypeError(f"expected {len(items)} values ({names}), got {value!r}")
        return tuple(_coerce(k, v) for k, v in zip(items, value))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise TypeError("expected a finite number")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
        raise TypeError(f"expected {names.get(kind, kind.__name__)}, got {type(value).__name__}")
    return value


def check_option(cls: type, name: str, value: Any) -> Any:
    """``value`` checked (type, then allowed values) for field ``name`` of dataclass ``cls``;
    returns it converted (an int where a float is expected becomes a float).

    Raises:
      OptionError: naming the field, the value and what is allowed.
    """
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    try:
        value = _coerce(_types(cls)[name], value)
    except TypeError as err:
        raise OptionError(name, value, str(err)) from None
    if value is None:
        return value
    meta = f.metadata
    if isinstance(value, tuple):  # ranges and choices are for single values
        problem = meta["check"](value) if meta.get("check") else None
        if problem:
            raise OptionError(name, value, problem)
        return value
    bad = (
        (meta.get("choices") and value not in meta["choices"])
        or (meta.get("low") is not None and value < meta["low"])
        or (meta.get("above") is not None and value <= meta["above"])
        or (meta.get("below") is not None and value >= meta["below"])
    )
    if bad:
        raise OptionError(name, value, allowed_values(f) or "not allowed")
    problem = meta["check"](value) if meta.get("check") else None
    if problem:
        raise OptionError(name, value, problem)
    return value


def check_options(obj: Any) -> None:
    """Check (and convert in place) every field of dataclass instance ``obj``."""
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, check_option(type(obj), f.name, getattr(obj, f.name)))
