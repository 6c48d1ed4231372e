"""Atomic writes: nothing half-written, nothing left behind, the user's umask."""

from __future__ import annotations

import os
import stat

import pytest

from gptfn.files import atomic_write, atomic_write_text, remove_stale_temps


def test_a_crash_mid_write_leaves_the_old_file_and_nothing_else(tmp_path):
    target = tmp_path / "last.safetensors"
    target.write_text("old")

    def crash(tmp):
        (tmp.parent / ".tmpXyZ123").write_text("a writer's own temp file")  # like safetensors
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "last.safetensors"
    ]


def test_new_files_get_the_users_umask_and_old_ones_keep_their_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640
    os.chmod(tmp_path / "new.json", 0o604)
    atomic_write_text(tmp_path / "new.json", "[]")
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o604


def test_remove_stale_temps_matches_only_gptfns_pattern(tmp_path):
    ours = [tmp_path / ".log.jsonl.abcd_123.tmp", tmp_path / ".train.bin.zzzzzzzz.tmp"]
    others = [tmp_path / ".log.jsonl.abc.tmp", tmp_path / ".other.abcd_123.tmp", tmp_path / "x"]
    for path in ours + others:
        path.write_text("")
    assert remove_stale_temps(tmp_path, ["log.jsonl", "train.bin"]) == sorted(ours)
    assert all(p.exists() for p in others)
