"""typing.py's docstring names exactly the functions that ``checked`` wraps."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import gptfn


def _checked_functions() -> set[str]:
    found = set()
    for info in pkgutil.walk_packages(gptfn.__path__, "gptfn."):
        if info.name == "gptfn.__main__":  # running it would start the CLI
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if getattr(value, "__gptfn_checked__", False) and value.__module__ == info.name:
                found.add(f"{info.name}.{name}")
    return found


def _resolve(path: str) -> object:
    """The object a dotted path names (a function may be documented where it is re-exported)."""
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def test_typing_docstring_names_the_checked_functions():
    first_paragraph = inspect.getdoc(gptfn.shapes).split("\n\n")[1]
    documented = set(re.findall(r"``(gptfn(?:\.\w+)+)``", first_paragraph))
    assert {id(_resolve(p)) for p in documented} == {id(_resolve(p)) for p in _checked_functions()}
    assert len(documented) == len(_checked_functions())
    assert documented  # the claim is about something


def test_each_checked_function_has_its_own_code_object():
    """torch.compile keeps graphs, and its limit of 8 recompiles, per code object: a wrapper
    code shared by forward, loss and the rest would make them use up one limit together."""
    codes = [gptfn.forward.__code__, gptfn.loss.__code__, gptfn.run_with_cache.__code__]
    assert len({id(c) for c in codes}) == len(codes)
    assert [c.co_name for c in codes] == ["forward", "loss", "run_with_cache"]
