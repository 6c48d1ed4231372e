"""experiments/speedrun.py: reading steps and losses off a curve, and the whole path on a tiny
corpus (``--quick``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from gptfn.data import prepare

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import speedrun

CURVE = [{"step": 100, "val": 2.0}, {"step": 200, "val": 1.6}, {"step": 300, "val": 1.5}]


def test_steps_to_a_target_interpolate_between_evaluations():
    assert speedrun.steps_to(CURVE, 1.8) == pytest.approx(150)
    assert speedrun.steps_to(CURVE, 1.55) == pytest.approx(250)
    assert speedrun.steps_to(CURVE, 2.5) == 100  # reached at the first evaluation
    assert speedrun.steps_to(CURVE, 1.4) is None
    assert speedrun.loss_at(CURVE, 250) == pytest.approx(1.55)
    assert speedrun.loss_at(CURVE, 50) == 2.0 and speedrun.loss_at(CURVE, 301) is None


def test_runs_parse_into_recipe_and_options():
    label, options = speedrun.parse_run("b16=gpt2,batch_size=16,schedule=wsd,zero_init=true")
    assert label == "b16"
    assert options == {"recipe": "gpt2", "batch_size": 16, "schedule": "wsd", "zero_init": True}
    cfg = speedrun.config(options, 77)
    assert (cfg.data.batch_size, cfg.optimizer.schedule, cfg.run.max_steps) == (16, "wsd", 77)
    assert cfg.model.zero_init and cfg.optimizer.optimizer == "adamw"  # gpt2's, not speedrun's


def test_quick_trains_two_recipes_and_prints_the_table(tmp_path, capsys):
    text = tmp_path / "play.txt"
    lines = [
        f"KING {i % 7}:\nWhat say you, lord {i % 13}? The night is {i % 5}.\n\n" for i in range(400)
    ]
    text.write_text("".join(lines))
    prepare(text, tmp_path / "data", tokenizer="char")
    assert speedrun.main(["--quick", "--data", str(tmp_path / "data")]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| gpt2 ") or
            r.startswith("| speedrun ")]  # fmt: skip
    assert len(rows) == 2
    cells = [r.strip("|").split("|") for r in rows]
    assert cells[0][3].strip() == "1.00"  # the baseline's own step-time ratio
    for row in cells:
        final = float(row[-1].split("@")[0])
        assert math.isfinite(final) and final < math.log(len(set(text.read_text()))) + 0.5


def test_logs_reads_steps_seconds_and_budgets_off_a_train_log(tmp_path):
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    records = [
        {"step": 10, "train_loss": 3.0, "tokens_per_s": 900.0, "time": 50.0},
        {"step": 20, "train_loss": 2.0, "tokens_per_s": 1100.0, "time": 305.0, "val_loss": 2.0},
        {"step": 30, "train_loss": 1.5, "tokens_per_s": 1000.0, "time": 505.0, "val_loss": 1.5},
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = speedrun.logs_report([run])
    cells = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    # 1.585 lies 83 % of the way from 2.0 (step 20, 305 s) to 1.5 (step 30, 505 s)
    assert cells[:5] == ["mine", "30", "1,000", "28", "471"]
    assert cells[5:] == ["1.750", "1.500 (ended)", "1.500 @ 505 s"]  # 405 s: half-way
    with pytest.raises(SystemExit, match=r"no log\.jsonl"):
        speedrun.logs_report([tmp_path])
