"""``import gptfn`` imports like a library: every subpackage is an attribute, every name in
``__all__`` resolves, and hypothesis (a dev extra) is loaded only by ``gptfn.testing``."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import gptfn

NOT_IMPORTED = {"__main__", "cli"}  # the face imports the library, not back
SHADOWED: set[str] = set()  # no module is hidden by a function of the same name


MODULES = sorted(m.name for m in pkgutil.iter_modules(gptfn.__path__) if m.name not in NOT_IMPORTED)


@pytest.fixture(scope="module")
def fresh() -> dict:
    """What a fresh interpreter sees after a plain ``import gptfn`` (one subprocess)."""
    code = f"""
        import json, sys
        import gptfn
        before = "hypothesis" in sys.modules
        lm_eval_before = "lm_eval" in sys.modules
        sys.modules["hypothesis"] = None  # as if hypothesis were not installed
        try:
            gptfn.testing
            error = None
        except Exception as e:
            error = type(e).__name__ + ": " + str(e)
        del sys.modules["hypothesis"]  # installed after all: gptfn.testing now loads
        kinds = {{n: type(getattr(gptfn, n, None)).__name__ for n in {MODULES!r}}}
        missing = [n for n in gptfn.__all__ if not hasattr(gptfn, n)]
        print(json.dumps(dict(before=before, error=error, kinds=kinds, missing=missing,
                              lm_eval_before=lm_eval_before)))
        """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_every_module_is_an_attribute_after_plain_import(fresh):
    assert {"research", "train", "testing", "evaluate", "data", "optim", "model"} <= set(MODULES)
    wrong = {n: k for n, k in fresh["kinds"].items() if k != "module" and n not in SHADOWED}
    assert not wrong, f"not reachable as modules after `import gptfn`: {wrong}"
    assert not fresh["missing"], f"names in gptfn.__all__ that do not resolve: {fresh['missing']}"


def test_testing_is_lazy_and_says_what_to_install(fresh):
    assert not fresh["before"], "import gptfn must not import hypothesis (a dev extra)"
    assert fresh["error"].startswith("ImportError: gptfn.testing needs 'hypothesis'")
    assert "pip install 'gptfn[dev]'" in fresh["error"]
    assert not fresh["lm_eval_before"], "import gptfn must not import lm_eval (an extra)"


def test_all_lists_the_research_entry_points_once():
    assert len(gptfn.__all__) == len(set(gptfn.__all__))
    for name in ["run_with_cache", "run_with_patches", "logit_lens", "hvp", "per_example_grads"]:
        assert name in gptfn.__all__
    assert gptfn.run_with_cache is gptfn.research.interp.run_with_cache
    assert gptfn.hvp is gptfn.research.curvature.hvp
    assert all(hasattr(gptfn.optim, n) for n in gptfn.optim.__all__)


def test_no_module_shadows_the_standard_library_and_all_lives_in_packages():
    """``from gptfn import *`` after ``import typing, inspect`` must leave them the stdlib's:
    no gptfn module has a standard-library name, and ``__all__`` is declared only by
    packages (``__init__.py``), never by the modules inside them."""
    stdlib = set(sys.stdlib_module_names)
    modules = list(pkgutil.walk_packages(gptfn.__path__, "gptfn."))
    shadowing = [m.name for m in modules if m.name.rsplit(".", 1)[-1] in stdlib]
    assert not shadowing, f"modules named like the standard library: {shadowing}"
    assert not {"typing", "inspect"} & set(gptfn.__all__)
    declaring = []
    for m in modules:
        if m.ispkg or m.name.endswith("__main__"):
            continue
        path = pkgutil.get_loader(m.name).get_filename()
        with open(path, encoding="utf-8") as file:
            text = file.read()
        if "\n__all__ = " in text:
            declaring.append(m.name)
    assert not declaring, f"__all__ outside package __init__ files: {declaring}"
