"""A training run's folder: never replaced without being asked, left clean after a crash.

``OUT/last.safetensors``, ``OUT/best.safetensors`` and ``OUT/log.jsonl`` make a run. Starting
a run where one exists is an error unless ``resume`` (continue it) or ``overwrite`` (delete
it first). Every start removes the temporary files a crash mid-write left behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gptfn.checkpoint import read_meta
from gptfn.files import atomic_write_text, remove_stale_temps

RUN_FILES = ("last.safetensors", "best.safetensors", "log.jsonl")
DCP_FOLDERS = ("last.dcp", "best.dcp")  # an --fsdp run's checkpoints (gptfn.distributed.dcp)
DERIVED_FILES = ("curves.png",)  # written by ``gptfn plot`` from the log


class RunExistsError(FileExistsError):
    """The output folder holds a run, and neither resume nor overwrite was asked for."""


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Raise :class:`RunExistsError` when ``run_dir`` holds a run and neither flag is set."""
    found = [name for name in RUN_FILES + DCP_FOLDERS if (run_dir / name).exists()]
    if not found or resume or overwrite:
        return
    last = next(
        (p for p in (run_dir / n for n in ("last.dcp", "last.safetensors")) if p.exists()), None
    )
    try:
        held = f"a run at step {read_meta(last)['step']}" if last is not None else "a run"
    except (ValueError, KeyError, FileNotFoundError):
        held = "a run"
    raise RunExistsError(
        f"{run_dir} already holds {held} ({', '.join(found)}). Continue it with --resume, "
        f"replace it with --overwrite, or choose another --out."
    )


def clear_run(run_dir: Path) -> list[str]:
    """Delete the run's files (checkpoints, log, plot) for ``--overwrite``; returns their names."""
    gone = []
    for name in RUN_FILES + DERIVED_FILES:
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            gone.append(name)
    for name in DCP_FOLDERS + tuple(n + ".tmp" for n in DCP_FOLDERS):
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
            gone.append(name)
    return gone


def clean_temps(run_dir: Path) -> list[Path]:
    """Remove temporary files of interrupted checkpoint writes."""
    return remove_stale_temps(run_dir, RUN_FILES)


def trim_log(run_dir: Path, step: int) -> None:
    """Keep the log's records up to ``step`` (where a resumed run continues): the steps after
    it are trained again, so their old records would mix two trajectories in one plot."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
