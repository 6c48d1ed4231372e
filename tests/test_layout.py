"""The house keeps its shape: each part imports only the layers below it (ARCHITECTURE.md), and
no function in gptfn/ is longer than a screen."""

from __future__ import annotations

import ast
from pathlib import Path

import gptfn

ROOT = Path(gptfn.__file__).parent
FOUNDATIONS = {"tree", "shapes", "tracing", "compiling", "files", "settings"}
ALLOWED = {  # part -> the parts (besides foundations and itself) it may import
    "model": set(),
    "optim": set(),
    "data": set(),
    "distributed": set(),
    "families": {"model"},
    "research": {"model"},
    "generation": {"model"},
    "checkpoint": {"model", "data", "lora", "pretrained", "distributed"},  # LoRA: base +
    # adapters; distributed: load_run reads an --fsdp run's DCP folder
    "pretrained": {"model", "families", "data"},
    "evaluate": {"model", "data", "checkpoint", "generation"},
    "lora": {"model", "families", "pretrained", "files", "tree"},
    "lm_eval": {"model", "data", "checkpoint", "generation", "pretrained"},
    "testing": {"model"},
    "train": {
        "model",
        "optim",
        "data",
        "distributed",
        "checkpoint",
        "pretrained",
        "families",
        "generation",
        "evaluate",
    },
}
"""Everything may use the foundations; ``cli`` may use everything; nothing imports ``cli``."""


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0]


def _gptfn_imports(path: Path) -> set[str]:
    """The gptfn parts a file imports (``gptfn.model.core`` -> ``model``), at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("gptfn."):
                found.add(name.split(".")[1])
    return found


def test_each_part_imports_only_the_layers_below_it():
    wrong = []
    for path in ROOT.rglob("*.py"):
        part = _part(path)
        if part in FOUNDATIONS | {"cli", "__init__", "__main__"}:
            allowed = FOUNDATIONS if part in FOUNDATIONS else None
        else:
            allowed = FOUNDATIONS | ALLOWED[part] | {part}
        used = _gptfn_imports(path)
        if "cli" in used and part not in ("cli", "__main__"):
            wrong.append(f"{path.relative_to(ROOT)} imports the CLI")
        if allowed is not None and used - allowed:
            wrong.append(f"{path.relative_to(ROOT)} ({part}) imports {sorted(used - allowed)}")
    assert not wrong, "\n".join(wrong)


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(ROOT)}: {node.name} has {length} lines")
    assert not long, "\n".join(long)


def test_one_tree_alias():
    defined = [
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*.py")
        if "\nTree = " in path.read_text(encoding="utf-8")
    ]
    assert defined == ["tree.py"], defined
