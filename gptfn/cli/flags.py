"""Checked argparse values, and flags generated from settings dataclasses (``GPTConfig``'s
fields through the model section, the optimizer's, the run's): one flag per field, its help
line, default and allowed values from the field's metadata, every value checked as parsed."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from typing import Any

from gptfn.settings import OptionError, allowed_values, check_option, value_type

NAMES = {int: "an integer", float: "a number"}


def number(
    kind: type,
    low: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind`` in the given range, else an error naming what is allowed."""
    bounds = ((">=", low), (">", above), ("<=", at_most), ("<", below))
    allowed = " and ".join(f"{op} {x:g}" for op, x in bounds if x is not None)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected {NAMES[kind]}"
            ) from None
        if (
            (low is not None and value < low)
            or (above is not None and value <= above)
            or (at_most is not None and value > at_most)
            or (below is not None and value >= below)
            or value != value  # NaN
        ):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {allowed}")
        return value

    return parse


def _parse(kind: Any, text: str) -> Any:
    """``text`` as a value of ``kind``; a fixed tuple is its items separated by commas."""
    if hasattr(kind, "from_value"):  # read by its own class (``GPTConfig.rope_scaling``)
        return text
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        parts = text.split(",")
        if len(parts) != len(items):
            names = ",".join(k.__name__ for k in items)
            raise ValueError(f"expected {len(items)} values separated by commas ({names})")
        return tuple(k(p) for k, p in zip(items, parts))
    return kind(text)


def option_type(cls: type, name: str, kind: Any) -> Callable[[str], Any]:
    """An argparse ``type`` for a field of a settings dataclass: the dataclass's own checks."""

    def parse(text: str) -> Any:
        try:
            value = _parse(kind, text)
        except ValueError as err:
            expected = NAMES.get(kind, getattr(kind, "__name__", str(kind)))
            reason = str(err) if typing.get_origin(kind) is tuple else f"expected {expected}"
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {reason}") from None
        try:
            return check_option(cls, name, value)
        except OptionError as err:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {err.problem}") from None

    return parse


def on_off(value: bool) -> str:
    return "on" if value else "off"


def add_dataclass_flags(
    group: Any, cls: type, defaults: Any, special: dict[str, Callable[..., None]] | None = None
) -> None:
    """One flag per field of dataclass ``cls`` (``--n-layer`` for ``n_layer``): booleans as
    ``--x/--no-x``, others typed and checked; ``special[name](group, flag, help)`` adds a field
    that needs its own form. Flags default to unset, so only given options reach the config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        default = getattr(defaults, f.name)
        kind = value_type(hints[f.name])
        if special and f.name in special:
            special[f.name](group, flag, text)
        elif kind is bool:
            shown = text if default is None else f"{text} (default: {on_off(default)})"
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=shown
            )
        else:
            limits = allowed_values(f)
            shown = "" if not limits or f.metadata.get("choices") else f"; {limits}"
            group.add_argument(
                flag,
                type=option_type(cls, f.name, kind),
                default=argparse.SUPPRESS,
                choices=f.metadata.get("choices"),
                metavar=f.name.upper() if typing.get_origin(kind) is tuple else None,
                help=f"{text} (default: {default}{shown})" if default is not None else text,
            )


POSITIVE, COUNT = number(int, low=1), number(int, low=0)
