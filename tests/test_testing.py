"""gptfn.testing: the checks pass on gptfn and catch real bugs within hypothesis' default budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gptfn
from gptfn.testing import (
    assert_batch_independent,
    assert_causal,
    assert_compile_matches_eager,
    assert_grads_match,
    assert_no_mutation,
    assert_vmap_matches_loop,
    configs,
    models,
    tokens,
)

DEFAULT_BUDGET = settings(max_examples=100)  # hypothesis' default, whatever conftest sets
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from testing_budget import BUGS, property_for, small_models  # noqa: E402  (the buggy functions)

# ----------------------------------------------------------------------------- gptfn passes


@given(small_models(), st.data())
def test_gptfn_forward_is_causal_and_batch_independent(model, data):
    cfg, params = model
    toks = data.draw(tokens(cfg, batch=(1, 3)))
    assert_causal(gptfn.forward, params, toks)
    assert_batch_independent(gptfn.forward, params, toks)
    assert_no_mutation(gptfn.forward, params, toks)


@given(
    models(
        configs(block_size=(2, 6), n_layer=(1, 1), n_head=(1, 2), head_size=(1, 3)), init_scale=1.0
    ),
    st.data(),
)
def test_gptfn_loss_gradients_match(model, data):
    cfg, params = model
    toks = data.draw(tokens(cfg, batch=(1, 2), length=(2, cfg.block_size)))
    assert_grads_match(gptfn.loss, params, toks, toks.roll(1, dims=1), directions=2)


def test_gptfn_vmap_and_compile_match():
    cfg = gptfn.GPTConfig(13, 8, 1, 2, 8)
    stacked = gptfn.tree.stack([gptfn.init(cfg, seed=s) for s in range(3)])
    toks = torch.randint(0, 13, (2, 8))
    assert_vmap_matches_loop(gptfn.forward, stacked, toks)
    assert_compile_matches_eager(gptfn.forward, gptfn.init(cfg), toks)


def test_strategies_shrink_to_the_smallest_case():
    from hypothesis import find

    cfg = find(configs(), lambda c: True)
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (2, 1, 1, 1, 1)
    toks = find(tokens(gptfn.GPTConfig(5, 8, 1, 1, 4)), lambda t: True)
    assert toks.tolist() == [[0]]


def test_configs_draw_every_field_or_name_it_exempt():
    import dataclasses

    from hypothesis import find

    from gptfn.testing import DRAWN, EXEMPT

    fields = {f.name for f in dataclasses.fields(gptfn.GPTConfig)}
    assert DRAWN | set(EXEMPT) == fields, (
        f"neither drawn nor exempt: {fields - DRAWN - set(EXEMPT)}"
    )
    assert not DRAWN & set(EXEMPT)
    plain = gptfn.GPTConfig(2, 1, 1, 1, 2)
    for name in sorted(DRAWN - {"vocab_size", "block_size", "n_layer", "n_head", "n_embd"}):
        find(  # each drawn field does take a value other than GPT-2's default
            configs(head_size=(2, 4)),
            lambda c, n=name: getattr(c, n) != getattr(plain, n),
            settings=settings(max_examples=500, database=None),
        )


def test_importing_gptfn_does_not_import_hypothesis():
    code = "import sys, gptfn; print('hypothesis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- bugs are caught


@pytest.mark.parametrize("bug", list(BUGS))
def test_each_bug_is_caught_within_the_default_budget(bug):
    body, strategy, message = BUGS[bug]
    with pytest.raises(AssertionError, match=message):
        DEFAULT_BUDGET(property_for(body, strategy))()
