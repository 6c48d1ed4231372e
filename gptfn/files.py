"""Atomic file writes: write a temporary file beside the target, fsync, then rename over it.

The temporary file lives in a private folder ``.<target name>.<8 random characters>.tmp``
beside the target (so that whatever the writer makes on the side, like the ``.tmpXXXXXX`` file
safetensors writes first, is inside it too). A crash can leave that folder behind;
:func:`remove_stale_temps` removes those (and nothing else) the next time the folder is written.
The finished file gets the mode any new file would get (the user's umask), or keeps the mode of
the file it replaces.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

_RANDOM = "[a-z0-9_]{8}"  # tempfile's names: 8 of these characters


def _temp_prefix(name: str) -> str:
    return f".{name}."


def _new_file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would leave: the existing file's, else 0o666 less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then atomically move it to ``path``: readers see old or new, never
    a half-written file, and a crash leaves the old file in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_stale_temps(directory: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``directory`` for the targets
    ``names`` (after a crash mid-write); returns what it deleted. Other files are untouched."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    patterns = [re.compile(re.escape(_temp_prefix(n)) + _RANDOM + r"\.tmp") for n in names]
    removed = []
    for entry in sorted(directory.iterdir()):
        if any(p.fullmatch(entry.name) for p in patterns):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
