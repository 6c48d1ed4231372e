"""LoRA (``gptfn.lora``): merge against the formula in gptfn's layouts, gradients, ensembles,
one compiled train step, clear errors, and PEFT's adapter files both ways on tiny random Hugging
Face models of every family (offline)."""

from __future__ import annotations

import dataclasses
import json

import optree
import pytest
import torch
from conftest import random_tokens
from hf_models import FAMILY_CONFIGS, hf_model

import gptfn
from gptfn import lora

peft = pytest.importorskip("peft")

FAMILIES = {"gpt2": "gpt2", "llama_gqa": "llama", "qwen2": "qwen2", "neox_pythia": "gpt_neox"}
ALL = ("w_q", "w_k", "w_v", "w_o", "w_gate", "w_in", "w_out", "unembed")


def _config(name: str) -> gptfn.GPTConfig:
    hf = FAMILY_CONFIGS[name]().to_dict()
    return gptfn.families.family(hf["model_type"]).config_from_hf(hf)


def _present(params: dict, targets=ALL) -> tuple[str, ...]:
    block = params["blocks"][0]
    leaves = {**block["attn"], **block["mlp"], **params}
    return tuple(t for t in targets if t in leaves)


def _randomise_b(adapters: dict, seed: int = 1, std: float = 0.1) -> dict:
    """Nonzero B (init's are zero, which would hide any layout mistake)."""
    gen = torch.Generator().manual_seed(seed)

    def fill(path, x):
        if not path or path[-1] != "b":
            return x
        return (torch.randn(x.shape, generator=gen, dtype=torch.float64) * std).to(x)

    return optree.tree_map_with_path(fill, adapters)


# ----------------------------------------------------------------------------- merge


def _expected(name: str, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float):
    """W + s B A written out per layout with einsum (independent of lora's reshapes)."""
    r = a.shape[0]
    if name in ("w_q", "w_k", "w_v"):
        return w + s * torch.einsum("hkr,rd->dhk", b.reshape(w.shape[1], w.shape[2], r), a)
    if name == "w_o":
        return w + s * torch.einsum("dr,rhk->hkd", b, a.reshape(r, w.shape[0], w.shape[1]))
    if name in ("w_in", "w_gate"):
        return w + s * torch.einsum("fr,rd->df", b, a)
    if name == "w_out":
        return w + s * torch.einsum("dr,rf->fd", b, a)
    assert name == "unembed"
    return w + s * torch.einsum("vr,rd->vd", b, a)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("rslora", [False, True])
def test_merge_is_w_plus_scaled_ba_in_each_layout(name, rslora):
    params = gptfn.init(_config(name), seed=0, dtype=torch.float64)
    targets = _present(params)
    adapters = _randomise_b(lora.init(params, 3, 5.0, targets, seed=2, use_rslora=rslora))
    merged = lora.merge(params, adapters)
    scale = 5.0 / (3**0.5 if rslora else 3)
    assert adapters["lora"].scaling == pytest.approx(scale)
    seen = set()
    for i, (block, new) in enumerate(zip(params["blocks"], merged["blocks"])):
        for group in ("attn", "mlp"):
            for leaf, w in block[group].items():
                pair = adapters["blocks"][i].get(group, {}).get(leaf)
                if pair is None:
                    assert new[group][leaf] is w
                    continue
                seen.add(leaf)
                want = _expected(leaf, w, pair["a"], pair["b"], scale)
                torch.testing.assert_close(new[group][leaf], want, rtol=0, atol=1e-13)
    if "unembed" in targets:
        pair = adapters["unembed"]
        want = _expected("unembed", params["unembed"], pair["a"], pair["b"], scale)
        torch.testing.assert_close(merged["unembed"], want, rtol=0, atol=1e-13)
        seen.add("unembed")
    assert seen == set(targets)
    back = lora.unmerge(merged, adapters)
    for x, y in zip(gptfn.tree.leaves(back), gptfn.tree.leaves(params)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-14)


def test_w_qkv_adapter_is_one_a_and_rows_q_k_v():
    params = gptfn.init(_config("llama_gqa"), seed=0, dtype=torch.float64)
    adapters = _randomise_b(lora.init(params, 2, 4.0, ("w_qkv",)))
    merged = lora.merge(params, adapters)
    attn, pair = params["blocks"][1]["attn"], adapters["blocks"][1]["attn"]["w_qkv"]
    sizes = [attn[n].shape[1] * attn[n].shape[2] for n in ("w_q", "w_k", "w_v")]
    assert pair["b"].shape == (sum(sizes), 2)
    for n, b in zip(("w_q", "w_k", "w_v"), torch.split(pair["b"], sizes)):
        want = _expected(n, attn[n], pair["a"], b, 2.0)
        torch.testing.assert_close(merged["blocks"][1]["attn"][n], want, rtol=0, atol=1e-13)


def test_init_draws_a_like_peft_and_b_zero():
    params = gptfn.init(_config("llama_gqa"), seed=0)
    adapters = lora.init(params, 4, 8, ("w_q", "w_out"), seed=3)
    a = adapters["blocks"][0]["attn"]["w_q"]["a"]
    bound = 1 / params["wte"].shape[1] ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert a.std().item() == pytest.approx(bound / 3**0.5, rel=0.3)
    assert not any(torch.any(b["attn"]["w_q"]["b"]) for b in adapters["blocks"])
    merged = lora.merge(params, adapters)
    assert all(torch.equal(x, y) for x, y in zip(*map(gptfn.tree.leaves, (merged, params))))
    same = lora.init(params, 4, 8, ("w_q", "w_out"), seed=3)
    assert torch.equal(
        same["blocks"][1]["mlp"]["w_out"]["a"], adapters["blocks"][1]["mlp"]["w_out"]["a"]
    )
    assert gptfn.tree.leaves(adapters) and "lora" not in gptfn.tree.flatten(adapters)


# ----------------------------------------------------------------------------- transforms


def _setup(name: str = "llama_gqa", dtype=torch.float64):
    params = gptfn.init(_config(name), seed=0, dtype=dtype)
    adapters = _randomise_b(lora.init(params, 2, 4.0, ("w_q", "w_v", "w_out", "unembed")))
    vocab = params["wte"].shape[0]
    return params, adapters, random_tokens(vocab, 2, 6, 0), random_tokens(vocab, 2, 6, 1)


def test_grads_over_adapters_match_finite_differences():
    params, adapters, x, y = _setup()

    def f(ad):
        return gptfn.loss(lora.merge(params, ad), x, y)

    grads = torch.func.grad(f)(adapters)
    eps = 1e-6
    for path in (("blocks", 0, "attn", "w_q", "a"), ("blocks", 1, "mlp", "w_out", "b"),
                 ("unembed", "a"), ("blocks", 1, "attn", "w_v", "b")):  # fmt: skip
        for index in ((0, 1), (1, 0)):

            def bumped(delta, path=path, index=index):
                flat = gptfn.tree.flatten(adapters)
                key = ".".join(map(str, path))
                flat[key] = flat[key].clone()
                flat[key][index] += delta
                return f({**gptfn.tree.unflatten(flat), "lora": adapters["lora"]})

            numeric = (bumped(eps) - bumped(-eps)) / (2 * eps)
            grad = grads
            for key in path:
                grad = grad[key]
            assert grad[index].item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-9)


def test_sgd_on_adapters_leaves_the_base_bit_identical():
    params, adapters, x, y = _setup(dtype=torch.float32)
    snapshot = optree.tree_map(torch.clone, params)

    def f(ad):
        return gptfn.loss(lora.merge(params, ad), x, y)

    losses = []
    for _ in range(3):
        grads, loss = torch.func.grad_and_value(f)(adapters)
        adapters = optree.tree_map(lambda p, g: p - 0.5 * g, adapters, grads)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert adapters["lora"] == lora.LoRAConfig(2, 4.0, ("w_q", "w_v", "w_out", "unembed"))
    for path, leaf in gptfn.tree.flatten(params).items():
        assert torch.equal(leaf, gptfn.tree.flatten(snapshot)[path]), path


def test_vmap_over_an_ensemble_of_adapters_equals_a_loop():
    params, _, x, _ = _setup(dtype=torch.float32)
    ensemble = [
        _randomise_b(lora.init(params, 2, 4.0, ("w_q", "w_v", "w_out"), seed=s), seed=s)
        for s in range(3)
    ]
    stacked = gptfn.tree.stack(ensemble)

    def logits(p, ad):
        return gptfn.forward(lora.merge(p, ad), x)

    batched = torch.func.vmap(logits, in_dims=(None, 0))(params, stacked)
    looped = torch.stack([logits(params, ad) for ad in ensemble])
    assert not torch.allclose(looped[0], looped[1])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)


def test_compiled_lora_train_step_runs_three_steps_without_recompiling():
    params, adapters, _, _ = _setup("gpt2_untied_gelu", dtype=torch.float32)
    vocab = params["wte"].shape[0]

    def step(params, adapters, x, y, lr):
        def f(ad):
            return gptfn.loss(lora.merge(params, ad), x, y)

        grads, loss = torch.func.grad_and_value(f)(adapters)
        return optree.tree_map(lambda p, g: p - lr * g, adapters, grads), loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    saved = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        eager = adapters
        for i in range(3):
            x, y = random_tokens(vocab, 2, 6, 10 + i), random_tokens(vocab, 2, 6, 20 + i)
            lr = torch.tensor(0.1 / (i + 1))
            adapters, loss = compiled(params, adapters, x, y, lr)
            eager, eager_loss = step(params, eager, x, y, lr)
            torch.testing.assert_close(loss, eager_loss)
    finally:
        torch._dynamo.config.error_on_recompile = saved
    for got, want in zip(gptfn.tree.leaves(adapters), gptfn.tree.leaves(eager)):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "targets, match",
    [
        (("w_foo",), r"'w_foo' is unknown; allowed targets: \('w_q'"),
        (("b_q",), r"'b_q' is a bias or norm, not a weight matrix; allowed targets"),
        (("w_gate",), r"'w_gate' is in no block of this model; targets it has: \['w_q'"),
        (("unembed",), r"'unembed' is in no block.*tied embeddings"),
        (("w_qkv", "w_q"), "drop w_q/w_k/w_v"),
        ((), "non-empty sequence"),
        ("w_q", "non-empty sequence"),
    ],
)
def test_bad_targets_are_clear_errors(targets, match):
    params = gptfn.init(_config("gpt2"))  # GELU MLP (no gate), tied embeddings, biases
    with pytest.raises(ValueError, match=match):
        lora.init(params, targets=targets)


@pytest.mark.parametrize(
    "rank, alpha, match",
    [
        (0, 16, "rank must be a positive integer, got 0"),
        (-2, 16, "rank must be a positive integer"),
        (2.0, 16, "rank must be a positive integer, got 2.0"),
        (True, 16, "rank must be a positive integer"),
        (25, 16, r"rank=25 exceeds min\(in, out\)=24 of blocks.0.attn.w_q .*allowed ranks.*1..24"),
        (4, 0, "alpha must be a positive finite number, got 0"),
        (4, float("nan"), "alpha must be a positive finite number"),
        (4, "16", "alpha must be a positive finite number"),
    ],
)
def test_bad_ranks_and_alphas_are_clear_errors(rank, alpha, match):
    params = gptfn.init(_config("gpt2"))
    with pytest.raises(ValueError, match=match):
        lora.init(params, rank, alpha, ("w_q", "w_v"))


# ----------------------------------------------------------------------------- PEFT files


def _hf_params(name: str) -> dict:
    model = hf_model(name)
    return optree.tree_map(torch.clone, gptfn.from_hf(model.state_dict(), model.config))


def _tokens(params: dict) -> torch.Tensor:
    return random_tokens(params["wte"].shape[0], 2, 9, 5)


def _peft_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits


CASES_TO_PEFT = {
    "gpt2 q and v": ("gpt2", ("w_q", "w_v"), {}),
    "gpt2 v scaled apart": ("gpt2", ("w_q", "w_v", "w_o", "w_out"), {"alpha_v": 3.0}),
    "gpt2 untied all": ("gpt2_untied_gelu", ("w_qkv", "w_o", "w_in", "w_out", "unembed"), {}),
    "llama all": ("llama_gqa", ALL, {"rslora": True}),
    "qwen2 fused qkv": ("qwen2", ("w_qkv", "w_gate"), {}),
    "neox q v and mlp": ("neox_pythia", ("w_q", "w_v", "w_in", "w_out", "unembed"), {}),
    "mistral q v": ("mistral", ("w_q", "w_v", "w_gate"), {}),
    "qwen3 all but unembed": ("qwen3", ("w_q", "w_k", "w_v", "w_o", "w_gate", "w_in", "w_out"), {}),
    "gemma2 q v o": ("gemma2", ("w_q", "w_v", "w_o"), {}),
    "olmo2 q k": ("olmo2", ("w_q", "w_k", "w_out"), {}),
}


@pytest.mark.parametrize("case", sorted(CASES_TO_PEFT))
def test_gptfn_adapters_load_in_peft(case, tmp_path):
    name, targets, opts = CASES_TO_PEFT[case]
    params = _hf_params(name)
    adapters = lora.init(params, 2, 6.0, targets, seed=4, use_rslora=opts.get("rslora", False))
    adapters = _randomise_b(adapters, std=0.3)
    if "alpha_v" in opts:  # w_v's scale differs from w_q's: folded into the fused B
        pattern = tuple((f"blocks.{i}.attn.w_v", opts["alpha_v"]) for i in range(2))
        adapters["lora"] = dataclasses.replace(adapters["lora"], alpha_pattern=pattern)
    lora.save_peft(adapters, tmp_path, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    tokens = _tokens(params)
    ours = gptfn.forward(lora.merge(params, adapters), tokens)
    assert (ours - gptfn.forward(params, tokens)).abs().max() > 1e-2  # the adapters matter
    theirs = _peft_logits(peft.PeftModel.from_pretrained(hf_model(name), tmp_path), tokens)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    back = lora.load_peft(tmp_path, params)  # and back: the same function
    torch.testing.assert_close(gptfn.forward(lora.merge(params, back), tokens), ours)


def _peft_model(name: str, seed: int = 7, **config):
    model = peft.get_peft_model(hf_model(name), peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


CASES_FROM_PEFT = {
    "gpt2 c_attn and both c_proj": ("gpt2", {"target_modules": ["c_attn", "c_proj"]}),
    "gpt2 layers_to_transform": (
        "gpt2",
        {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": [1], "r": 3},
    ),
    "gpt2 untied lm_head": ("gpt2_untied_gelu", {"target_modules": ["c_attn", "lm_head"]}),
    "llama patterns rslora": (
        "llama_gqa",
        {
            "target_modules": [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                "lm_head",
            ],
            "rank_pattern": {"q_proj": 2, "model.layers.1.mlp.up_proj": 5},
            "alpha_pattern": {"down_proj": 3},
            "use_rslora": True,
            "lora_alpha": 7,
            "lora_dropout": 0.1,
        },
    ),
    "qwen2 q v": ("qwen2", {"target_modules": ["q_proj", "v_proj"], "r": 3}),
    "gemma3 q v mlp": ("gemma3", {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 2}),
    "smollm3 o": ("smollm3", {"target_modules": ["o_proj", "up_proj"], "r": 2}),
    "neox all": (
        "neox_pythia",
        {"target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES_FROM_PEFT))
def test_peft_adapters_load_in_gptfn(case, tmp_path):
    name, config = CASES_FROM_PEFT[case]
    model = _peft_model(
        name, r=config.pop("r", 4), lora_alpha=config.pop("lora_alpha", 8), **config
    )
    model.save_pretrained(tmp_path)
    params = _hf_params(name)
    adapters = lora.load_peft(tmp_path, params)
    tokens = _tokens(params)
    ours = gptfn.forward(lora.merge(params, adapters), tokens)
    assert (ours - gptfn.forward(params, tokens)).abs().max() > 1e-2
    torch.testing.assert_close(ours, _peft_logits(model, tokens), rtol=0, atol=1e-5)
    if "layers_to_transform" in config:
        assert adapters["blocks"][0] == {} and set(adapters["blocks"][1]) == {"attn", "mlp"}
    if name.startswith(("gpt2", "neox")):
        assert "w_qkv" in adapters["blocks"][-1]["attn"]
        assert "w_q" not in adapters["blocks"][-1]["attn"]


def test_peft_file_names_and_patterns(tmp_path):
    params = _hf_params("gpt2")
    adapters = _randomise_b(lora.init(params, 2, 6.0, ("w_q", "w_v", "w_o", "w_out")))
    lora.save_peft(adapters, tmp_path, params)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["r"] == 2
    assert "transformer.h.0.attn.c_proj" in config["target_modules"]
    assert config["rank_pattern"] == {f"transformer.h.{i}.attn.c_attn": 4 for i in range(2)}
    assert config["alpha_pattern"] == {f"transformer.h.{i}.attn.c_attn": 12.0 for i in range(2)}
    import safetensors.torch

    tensors = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert a.shape == (4, 24) and b.shape == (72, 4)
    assert not torch.any(b[24:48]) and not torch.any(b[:24, 2:]) and not torch.any(b[48:, :2])


def test_dora_is_refused_by_name(tmp_path):
    _peft_model("llama_gqa", r=2, target_modules=["q_proj"], use_dora=True).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match=r"use_dora=True.*DoRA"):
        lora.load_peft(tmp_path, _hf_params("llama_gqa"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(ValueError, match=r"lora_magnitude_vector.*DoRA"):
        lora.load_peft(tmp_path, _hf_params("llama_gqa"))


@pytest.mark.parametrize(
    "option, match",
    [
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=.*full copies"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ],
)
def test_options_gptfn_cannot_express_are_refused(option, match, tmp_path):
    _peft_model("qwen2", r=2, target_modules=["q_proj"]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **option}))
    with pytest.raises(ValueError, match=match):
        lora.load_peft(tmp_path, _hf_params("qwen2"))


def test_bin_only_folder_is_refused_with_a_conversion_hint(tmp_path):
    model = _peft_model("qwen2", r=2, target_modules=["q_proj"])
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(FileNotFoundError, match=r"only adapter_model.bin.*save_file"):
        lora.load_peft(tmp_path, _hf_params("qwen2"))


def test_tied_lm_head_adapter_is_refused(tmp_path):
    _peft_model("gpt2", r=2, target_modules=["c_attn", "lm_head"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'unembed', which this model does not have"):
        lora.load_peft(tmp_path, _hf_params("gpt2"))
