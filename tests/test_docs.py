"""The Python examples in docs/ run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["testing.md", "research.md", "models.md"]


@pytest.mark.parametrize("page", PAGES)
def test_doc_examples_run(page, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
    assert blocks, f"{page} has no python example"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page}[python block {i}]", "exec"), namespace)
    if page == "testing.md":  # the broken variant was caught, with the documented message
        printed = capsys.readouterr().out
        assert printed.startswith("assert_causal: output at position 0 (row 0) changed by")
        assert "it sees the future (sequence length 2)" in printed
