"""experiments/optimizer_track.py in its ``--quick`` mode (seconds), so the script cannot rot:
every optimizer is tuned over its grid, the best learning rate is the grid's lowest final
loss, the seeds are reported, and a user optimizer is checked as ``gptfn train`` checks it."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import optimizer_track

NAMES = ["sgd", "adamw", "lion", "muon", "my_optimizers.lamb:lamb"]


def test_quick_track_tunes_each_optimizer_and_reports_every_seed(capsys):
    results = optimizer_track.main(["--quick", "--seeds", "2"])
    out = capsys.readouterr().out
    assert list(results) == NAMES
    for name in NAMES:
        assert len(results[name]) == 2 and all(math.isfinite(r.final_loss) for r in results[name])
        tuned = re.findall(rf"tune {re.escape(name)} +lr (\S+) +final (\S+)", out)
        assert len(tuned) == 2, out  # the quick grid: two learning rates each
        best = min(tuned, key=lambda t: float(t[1]))[0]
        assert re.search(rf"\| {re.escape(name)} \| {best} \(edge\) \| .* \| \d+ \|", out), out
    assert max(r.final_loss for r in results["adamw"]) < 3.9  # it learned (ln 60 ~ 4.1 at init)
    assert "| optimizer | lr (tuned) | steps to target" in out


def test_a_bad_user_optimizer_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as info:
        optimizer_track.main(["--quick", "--optimizer", "gptfn_no_such_module:make"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--optimizer: invalid value 'gptfn_no_such_module:make': cannot import module" in err
