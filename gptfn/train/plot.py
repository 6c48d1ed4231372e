"""Plots of a run's ``log.jsonl``: training and validation loss against step, and the LR."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(run_dir: str | Path) -> list[dict]:
    """The run's log records, one per logged step (the latest record wins after a resume)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    records: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[record["step"]] = record
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}, line {number}: not a log record: {line[:80]!r}") from None
    return [records[s] for s in sorted(records)]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a PNG of the loss curves and learning rate; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(run_dir)
    if not records:
        raise ValueError(
            f"{Path(run_dir) / 'log.jsonl'} has no records yet: nothing to plot (a run logs "
            "every --log-interval steps)"
        )
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig, (ax_loss, ax_lr) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    steps = [r["step"] for r in records]
    ax_loss.plot(steps, [r["train_loss"] for r in records], label="train loss", alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax_loss.plot(*zip(*val), "o-", label="val loss")
    ax_loss.set_ylabel("cross-entropy (nats)")
    ax_loss.set_title(
        f"{Path(run_dir).name}: loss "
        f"(val perplexity {records[-1].get('val_perplexity', float('nan')):.2f} at end)"
    )
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    for name, label in (("lr", "lr (AdamW part)"), ("muon_lr", "muon_lr")):
        if any(name in r for r in records):
            ax_lr.plot(steps, [r.get(name, float("nan")) for r in records], label=label)
    if any("muon_lr" in r for r in records):
        ax_lr.legend()
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
