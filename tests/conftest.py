"""Shared fixtures and hypothesis settings: every model here is tiny so the suite stays fast."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import gptfn
from gptfn.data import prepare, shakespeare

settings.register_profile(
    "gptfn",
    deadline=None,
    max_examples=int(os.environ.get("GPTFN_EXAMPLES", "20")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("gptfn")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def cfg() -> gptfn.GPTConfig:
    return gptfn.GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=48)


@pytest.fixture
def params(cfg: gptfn.GPTConfig) -> dict:
    return gptfn.init(cfg, seed=0)


def random_tokens(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """20,000 characters of the built-in corpus prepared at character level, once per module."""
    root = tmp_path_factory.mktemp("data")
    (root / "plays.txt").write_text(shakespeare()[:20_000])
    prepare(root / "plays.txt", root / "char", "char")
    return root / "char"
