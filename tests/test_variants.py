"""Every architecture option, one at a time and in the families' combinations: the model's
properties (causal, batch-independent, grad == autograd == finite differences, vmap == loop,
cache == recompute, fast == reference attention) hold for each; bad values are clear errors."""

from __future__ import annotations

import dataclasses

import optree
import pytest
import torch
from conftest import random_tokens

import gptfn
from gptfn.generation import extend, init_cache
from gptfn.testing import (
    assert_batch_independent,
    assert_causal,
    assert_grads_match,
    assert_vmap_matches_loop,
)

BASE = {"vocab_size": 13, "block_size": 7, "n_layer": 2, "n_head": 4, "n_embd": 16}
ROTARY = {"position": "rotary", "rope_theta": 100.0}
VARIANTS = {
    "gpt2": {},
    "no_bias": {"bias": False},
    "untied": {"tie_embeddings": False},
    "rotary": ROTARY,
    "rotary_partial": {**ROTARY, "rotary_fraction": 0.5},
    "rotary_llama3_scaling": {**ROTARY, "rope_scaling": (4.0, 1.0, 4.0, 4)},
    "rotary_linear_scaling": {**ROTARY, "rope_scaling": "linear,4"},
    "rotary_longrope": {**ROTARY, "rope_scaling": ("longrope", 8, 1.3, 1, 2, 3, 4)},
    "no_positions": {"position": "none"},
    "rmsnorm": {"norm": "rmsnorm", "norm_bias": False, "norm_eps": 1e-6},
    "rmsnorm_bias": {"norm": "rmsnorm"},
    "layernorm_no_bias": {"norm_bias": False},
    "gelu": {"mlp": "gelu"},
    "relu2": {"mlp": "relu2", "d_mlp": 24},
    "swiglu": {"mlp": "swiglu", "d_mlp": 20},
    "geglu": {"mlp": "geglu"},
    "grouped_query": {"n_kv_head": 2},
    "multi_query": {"n_kv_head": 1},
    "d_head": {"d_head": 6},
    "qk_norm": {"qk_norm": True},
    "qkv_bias_only": {"bias": False, "qkv_bias": True},
    "parallel_residual": {"parallel_residual": True},
    "softcap": {"logit_softcap": 2.0},
    "sliding_window": {"sliding_window": 3},
    "sliding_window_pattern": {**ROTARY, "sliding_window": 2, "window_pattern": "GL"},
    "rope_local_theta": {
        **ROTARY,
        "sliding_window": 2,
        "window_pattern": "LG",
        "rope_local_theta": 7.0,
        "rope_scaling": "linear,4",
    },
    "rope_layers": {**ROTARY, "rope_layers": "NR"},
    "post_norm": {"norm_position": "post", "norm": "rmsnorm"},
    "sandwich_norm": {"norm_position": "sandwich"},
    "qk_norm_projection": {"qk_norm": True, "qk_norm_span": "projection", "n_kv_head": 2},
    "rmsnorm_plus1": {"norm": "rmsnorm_plus1"},
    "embed_scale": {"embed_scale": True},
    "attn_scale_softcap": {"attn_scale": 0.3, "attn_softcap": 1.5},
    "gemma2": {
        **ROTARY,
        "norm": "rmsnorm_plus1",
        "norm_bias": False,
        "norm_position": "sandwich",
        "mlp": "geglu",
        "bias": False,
        "n_kv_head": 2,
        "d_head": 6,
        "embed_scale": True,
        "attn_scale": 0.25,
        "attn_softcap": 5.0,
        "logit_softcap": 3.0,
        "sliding_window": 3,
        "window_pattern": "LG",
    },
    "llama": {
        **ROTARY,
        "norm": "rmsnorm",
        "norm_bias": False,
        "mlp": "swiglu",
        "bias": False,
        "n_kv_head": 2,
        "tie_embeddings": False,
    },
    "qwen2": {
        **ROTARY,
        "norm": "rmsnorm",
        "norm_bias": False,
        "mlp": "swiglu",
        "bias": False,
        "qkv_bias": True,
        "n_kv_head": 1,
    },
    "neox": {
        **ROTARY,
        "rotary_fraction": 0.5,
        "mlp": "gelu",
        "parallel_residual": True,
        "tie_embeddings": False,
    },
}


def variant(
    name: str, dtype: torch.dtype = torch.float32, scale: float = 3.0, n_layer: int = 2
) -> dict:
    """A tiny model of the variant; weights scaled up so that mistakes show above noise, biases
    and norm weights randomised so that each of them matters."""
    cfg = gptfn.GPTConfig(**{**BASE, "n_layer": n_layer}, **VARIANTS[name])
    params = gptfn.init(cfg, seed=1, dtype=dtype)
    gen = torch.Generator().manual_seed(2)

    def jitter(x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return x * scale if x.ndim > 1 else x + 0.3 * noise

    return optree.tree_map(jitter, params)


@pytest.mark.parametrize("name", VARIANTS)
def test_properties_hold_for_every_variant(name):
    params = variant(name, torch.float64)
    toks = random_tokens(13, 3, 7, 4)
    assert_causal(gptfn.forward, params, toks, atol=1e-12)
    assert_batch_independent(gptfn.forward, params, toks, atol=1e-12)
    torch.testing.assert_close(
        gptfn.forward(params, toks, attention="fast"),
        gptfn.forward(params, toks, attention="reference"),
        atol=1e-10,
        rtol=1e-10,
    )
    stacked = gptfn.tree.stack([params, optree.tree_map(lambda x: x * 1.1, params)])
    assert_vmap_matches_loop(gptfn.forward, stacked, toks)


@pytest.mark.parametrize("name", VARIANTS)
def test_grads_match_for_every_variant(name):
    params = variant(name, scale=1.0, n_layer=1)
    toks = random_tokens(13, 2, 4, 5)
    assert_grads_match(gptfn.loss, params, toks, toks.roll(1, dims=1), directions=1)


@pytest.mark.parametrize("name", VARIANTS)
def test_cache_equals_recompute_for_every_variant(name):
    params = variant(name)
    seq = random_tokens(13, 2, 7, 6)
    cache = init_cache(params, 2, 7)
    logits, cache = extend(params, seq[:, :3], cache)
    pieces = [logits]
    for i in range(3, 7):
        logits, cache = extend(params, seq[:, i : i + 1], cache)
        pieces.append(logits)
    full = gptfn.forward(params, seq)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    cfg = gptfn.GPTConfig.from_params(params)
    assert cache["layers"][0]["k"].shape == (2, 7, cfg.n_kv_head, cfg.d_head)


@pytest.mark.parametrize("name", VARIANTS)
def test_ragged_generation_equals_each_prompt_alone(name):
    params = variant(name)
    prompts = [[1, 2, 3], [4], [5, 6]]
    together = gptfn.generate(params, prompts, 3, temperature=0)
    assert together == [gptfn.generate(params, [p], 3, temperature=0)[0] for p in prompts]


def test_the_tree_says_what_it_is():
    """The config rides in the tree: not a leaf for tree ops, grads, optimizers or checkpoints,
    and forward needs nothing else (a rotary tree has no position tensor to read)."""
    params = variant("llama")
    cfg = gptfn.GPTConfig.from_params(params)
    assert cfg.position == "rotary" and "wpe" not in params
    assert all(isinstance(x, torch.Tensor) for x in gptfn.tree.leaves(params))
    assert "config" not in " ".join(gptfn.tree.flatten(params))
    grads = torch.func.grad(gptfn.loss)(params, random_tokens(13, 1, 4), random_tokens(13, 1, 4))
    assert grads["config"] is cfg
    doubled = optree.tree_map(lambda x: 2 * x, params)
    assert doubled["config"] is cfg
    tx = gptfn.optim.adamw(1e-3)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    assert gptfn.optim.apply_updates(params, updates)["config"] is cfg


def test_compiled_forward_of_a_variant_matches_eager():
    params = variant("llama", n_layer=1)
    toks = random_tokens(13, 2, 5)
    compiled = torch.compile(gptfn.forward, fullgraph=True)
    torch.testing.assert_close(compiled(params, toks), gptfn.forward(params, toks))


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_of_every_variant_is_one_graph(name):
    """Dynamo alone decides graph breaks, so ``backend="eager"`` checks every variant cheaply
    (tests/test_compile.py runs inductor on a few)."""
    torch._dynamo.reset()
    params, toks = variant(name, n_layer=1), random_tokens(13, 2, 7)
    inputs, targets = toks[:, :-1], toks[:, 1:]
    compiled = torch.compile(gptfn.loss, fullgraph=True, backend="eager")
    expected = gptfn.loss(params, inputs, targets)
    torch.testing.assert_close(compiled(params, inputs, targets), expected)


@pytest.mark.parametrize("name", VARIANTS)
def test_config_round_trips(name):
    cfg = gptfn.GPTConfig(**BASE, **VARIANTS[name])
    assert gptfn.GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(gptfn.GPTConfig.from_dict(cfg.to_dict())) == hash(cfg)
    assert gptfn.GPTConfig.from_params(gptfn.init(cfg)) == cfg


def test_default_config_is_gpt2():
    cfg = gptfn.GPTConfig(**BASE)
    assert (cfg.position, cfg.norm, cfg.mlp, cfg.norm_eps) == (
        "learned",
        "layernorm",
        "gelu_tanh",
        1e-5,
    )
    assert (cfg.n_kv_head, cfg.d_head, cfg.d_mlp) == (4, 4, 64)
    assert cfg.bias and cfg.qkv_bias and cfg.mlp_bias and cfg.norm_bias and cfg.tie_embeddings
    assert not (cfg.qk_norm or cfg.parallel_residual) and cfg.logit_softcap is None
    every_field = {f.name for f in dataclasses.fields(gptfn.GPTConfig)}
    assert all(f.metadata.get("help") for f in dataclasses.fields(gptfn.GPTConfig)), every_field


@pytest.mark.parametrize(
    "options, words",
    [
        (
            {"position": "alibi"},
            "GPTConfig.position: invalid value 'alibi': one of learned, rotary, none",
        ),
        (
            {"norm": "batchnorm"},
            "GPTConfig.norm: invalid value 'batchnorm': one of layernorm, rmsnorm",
        ),
        ({"mlp": "silu"}, "one of gelu_tanh, gelu, relu2, swiglu, geglu"),
        ({"n_kv_head": 3}, r"GPTConfig.n_kv_head: invalid value 3: must divide n_head \(4\)"),
        ({"n_kv_head": 0}, "GPTConfig.n_kv_head: invalid value 0: must be >= 1"),
        ({"d_mlp": -1}, "GPTConfig.d_mlp: invalid value -1: must be >= 1"),
        ({"n_layer": 2.0}, "GPTConfig.n_layer: invalid value 2.0: expected an integer, got float"),
        ({"position": "rotary", "d_head": 3}, "must be even and >= 2"),
        (
            {"position": "rotary", "rotary_fraction": 0.0},
            r"rotary_fraction: .* must be > 0 and <= 1",
        ),
        ({"rope_theta": 0}, "GPTConfig.rope_theta: invalid value 0.0: must be > 0"),
        ({"norm_eps": -1e-5}, "GPTConfig.norm_eps: invalid value -1e-05: must be > 0"),
        ({"logit_softcap": 0.0}, "GPTConfig.logit_softcap: invalid value 0.0: must be > 0"),
        ({"qk_norm": "yes"}, "GPTConfig.qk_norm: invalid value 'yes': expected true or false"),
        ({"rope_scaling": (8.0, 1.0, 4.0, 8192)}, "rope_scaling: .* needs position='rotary'"),
        ({"rope_scaling": (8.0, 1.0)}, r"rope_scaling: .* llama3 scaling takes 4 numbers"),
        ({"rope_scaling": ("yarn", 8.0)}, r"rope_scaling: .*unknown rope scaling 'yarn'"),
        ({"n_embd": 18}, r"GPTConfig.n_embd: invalid value 18: must be a multiple of n_head \(4\)"),
    ],
)
def test_bad_options_are_clear_errors(options, words):
    with pytest.raises(ValueError, match=words):
        gptfn.GPTConfig(**{**BASE, **options})


def test_unknown_config_field_is_named():
    with pytest.raises(ValueError, match=r"unknown GPTConfig fields \['n_heads'\]"):
        gptfn.GPTConfig.from_dict({**BASE, "n_heads": 4})


def test_params_that_do_not_fit_the_config_are_named():
    params = gptfn.init(gptfn.GPTConfig(**BASE, n_kv_head=2))
    wrong = {**params, "config": gptfn.GPTConfig(**BASE)}
    with pytest.raises(
        ValueError, match=r"blocks.0.attn.w_k \(16, 2, 4\) \(expected \(16, 4, 4\)\)"
    ):
        gptfn.model.check_params(wrong)


OLD_KEYS = [  # the leaves gptfn's init made before the tree carried its config (df286b1)
    "blocks.0.attn.b_k",
    "blocks.0.attn.b_o",
    "blocks.0.attn.b_q",
    "blocks.0.attn.b_v",
    "blocks.0.attn.w_k",
    "blocks.0.attn.w_o",
    "blocks.0.attn.w_q",
    "blocks.0.attn.w_v",
    "blocks.0.ln_1.bias",
    "blocks.0.ln_1.scale",
    "blocks.0.ln_2.bias",
    "blocks.0.ln_2.scale",
    "blocks.0.mlp.b_in",
    "blocks.0.mlp.b_out",
    "blocks.0.mlp.w_in",
    "blocks.0.mlp.w_out",
    "ln_f.bias",
    "ln_f.scale",
    "wpe",
    "wte",
]


def test_checkpoints_and_trees_from_older_gptfn_still_work(tmp_path):
    from gptfn.checkpoint import load_checkpoint, save_checkpoint

    cfg = gptfn.GPTConfig(vocab_size=13, block_size=7, n_layer=1, n_head=4, n_embd=16)
    old_tree = {k: v for k, v in gptfn.init(cfg, seed=2).items() if k != "config"}
    assert sorted(gptfn.tree.flatten(old_tree)) == OLD_KEYS
    old_meta = {
        "step": 5,
        "model": {
            "vocab_size": 13,
            "block_size": 7,
            "n_layer": 1,
            "n_head": 4,
            "n_embd": 16,
            "bias": True,
            "tie_embeddings": True,
        },
    }
    save_checkpoint(tmp_path / "old.safetensors", old_tree, None, old_meta)
    params, _, meta = load_checkpoint(tmp_path / "old.safetensors")
    assert params["config"] == cfg and meta["model"] == cfg.to_dict()
    toks = random_tokens(13, 2, 7)
    torch.testing.assert_close(gptfn.forward(params, toks), gptfn.forward(old_tree, toks))
    assert gptfn.GPTConfig.from_params(old_tree) == cfg  # a tree without config: GPT-2 shapes
    assert gptfn.generate(old_tree, [[1, 2]], 3, temperature=0) == gptfn.generate(
        params, [[1, 2]], 3, temperature=0
    )


def test_checkpoint_of_a_variant_keeps_its_architecture(tmp_path):
    from gptfn.checkpoint import load_checkpoint, save_checkpoint

    params = variant("neox")
    save_checkpoint(tmp_path / "c.safetensors", params, None, {"step": 1})
    loaded, _, meta = load_checkpoint(tmp_path / "c.safetensors")
    assert meta == {"step": 1} and loaded["config"] == params["config"]
    toks = random_tokens(13, 2, 7)
    torch.testing.assert_close(gptfn.forward(loaded, toks), gptfn.forward(params, toks))


def test_module_bridge_keeps_the_architecture():
    params = variant("llama")
    module = gptfn.GPTModule(params)
    toks = random_tokens(13, 2, 5)
    torch.testing.assert_close(module(toks), gptfn.forward(params, toks))
    assert "config" not in dict(module.named_parameters())


@pytest.mark.parametrize("name", ["llama", "neox"])
def test_remat_gives_the_same_gradients_for_variants(name):
    params = variant(name, n_layer=2)
    toks = random_tokens(13, 2, 6)

    def grads(**kwargs):
        return gptfn.tree.flatten(torch.func.grad(gptfn.loss)(params, toks, toks, **kwargs))

    plain, rematted = grads(), grads(remat=True)
    for path, g in plain.items():
        torch.testing.assert_close(rematted[path], g, msg=path)


def test_half_precision_decoding_of_a_gated_grouped_model():
    params = gptfn.tree.cast(variant("llama"), torch.bfloat16)
    out = gptfn.generate(params, [[1, 2, 3], [4]], 3, temperature=0)
    assert [len(row) for row in out] == [3, 3]


@pytest.mark.parametrize("bias, tied", [(True, True), (False, False)])
def test_trees_without_config_are_read_as_gpt2_from_their_shapes(bias, tied):
    cfg = gptfn.GPTConfig(13, 7, 2, 4, 16, bias=bias, tie_embeddings=tied, d_mlp=24)
    bare = {k: v for k, v in gptfn.init(cfg).items() if k != "config"}
    assert gptfn.GPTConfig.from_params(bare) == cfg
    rotary = {k: v for k, v in variant("rotary").items() if k not in ("config", "wpe")}
    with pytest.raises(ValueError, match=r"no 'config' and no \['wpe'\].*params\['config'\]"):
        gptfn.GPTConfig.from_params(rotary)
