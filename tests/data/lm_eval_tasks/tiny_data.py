"""Loads the JSONL files beside this module as lm-eval datasets (offline, no cache)."""

import json
from pathlib import Path

import datasets


def load(file: str, **metadata: object) -> datasets.DatasetDict:
    """A DatasetDict with one ``test`` split read from ``file`` (a JSONL next to this module)."""
    lines = (Path(__file__).parent / file).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
