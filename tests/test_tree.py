"""Tree utilities: paths, flat dicts, stacking, norms and casts."""

from __future__ import annotations

import pytest
import torch

import gptfn
from gptfn import tree


def test_flatten_unflatten_round_trip(params):
    flat = tree.flatten(params)
    assert "blocks.1.attn.w_q" in flat and "ln_f.scale" in flat
    back = tree.unflatten(flat)
    assert isinstance(back["blocks"], list) and len(back["blocks"]) == 2
    assert tree.flatten(back).keys() == flat.keys()
    assert all(back_leaf is leaf for back_leaf, leaf in zip(tree.leaves(back), tree.leaves(params)))


def test_unflatten_rejects_bad_paths():
    with pytest.raises(ValueError, match=r"not 0\.\.1"):
        tree.unflatten({"a.0": torch.zeros(1), "a.2": torch.zeros(1)})
    with pytest.raises(ValueError, match="runs through a leaf"):
        tree.unflatten({"a": torch.zeros(1), "a.b": torch.zeros(1)})


def test_param_count_matches_formula(cfg, params):
    d, v, t, n = cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.n_layer
    per_block = 4 * d * d + 4 * d + 2 * (4 * d * d) + 4 * d + d + 4 * d
    assert tree.param_count(params) == v * d + t * d + n * per_block + 2 * d


def test_global_norm(params):
    flat = torch.cat([leaf.reshape(-1) for leaf in tree.leaves(params)])
    torch.testing.assert_close(tree.global_norm(params), flat.norm())


def test_map_with_path_sees_dotted_paths(params):
    seen = []
    doubled = tree.map_with_path(lambda path, x: seen.append(path) or x * 2, params)
    assert seen == list(tree.flatten(params))
    assert torch.equal(doubled["wte"], params["wte"] * 2)


def test_stack_unstack(cfg):
    trees = [gptfn.init(cfg, seed=s) for s in range(3)]
    stacked = tree.stack(trees)
    assert stacked["blocks"][0]["attn"]["w_q"].shape == (3, 48, 4, 12)
    for a, b in zip(tree.unstack(stacked), trees):
        assert all(torch.equal(x, y) for x, y in zip(tree.leaves(a), tree.leaves(b)))
    with pytest.raises(ValueError, match="at least one"):
        tree.stack([])


def test_cast(params):
    half = tree.cast({"p": params, "step": torch.tensor(3)}, torch.bfloat16)
    assert all(x.dtype == torch.bfloat16 for x in tree.leaves(half["p"]))
    assert half["step"].dtype == torch.int64
