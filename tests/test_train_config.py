"""Training options: sections, one check per option shared by flags, TOML and Python, and
error messages that name the option, the value and what is allowed (in-process: fast)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from gptfn.cli import build_parser, main
from gptfn.model import GPTConfig
from gptfn.model.config import RopeScaling
from gptfn.train import OptimizerConfig, OptionError, TrainConfig
from gptfn.train.options import load_toml

BAD_VALUES = [
    ("train --lr 0", "argument --lr: invalid value '0': must be > 0"),
    ("train --lr -0.001", "argument --lr: invalid value '-0.001': must be > 0"),
    ("train --lr abc", "argument --lr: invalid value 'abc': expected a number"),
    ("train --lr nan", "argument --lr: invalid value 'nan': expected a finite number"),
    ("train --eval-interval 0", "argument --eval-interval: invalid value '0': must be >= 1"),
    ("train --grad-accum 0", "argument --grad-accum: invalid value '0': must be >= 1"),
    ("train --log-interval 0", "argument --log-interval: invalid value '0': must be >= 1"),
    ("train --eval-steps 0", "argument --eval-steps: invalid value '0': must be >= 1"),
    ("train --batch-size 0", "argument --batch-size: invalid value '0': must be >= 1"),
    ("train --batch-size -4", "argument --batch-size: invalid value '-4': must be >= 1"),
    ("train --dropout 1.5", "argument --dropout: invalid value '1.5': must be >= 0 and < 1"),
    ("train --warmup-steps -5", "argument --warmup-steps: invalid value '-5': must be >= 0"),
    ("train --max-steps -10", "argument --max-steps: invalid value '-10': must be >= 1"),
    ("train --n-layer 1.5", "argument --n-layer: invalid value '1.5': expected an integer"),
    ("train --beta2 1", "argument --beta2: invalid value '1': must be >= 0 and < 1"),
    ("train --seed -1", "argument --seed: invalid value '-1': must be >= 0"),
    ("train --dtype float8", "--dtype: invalid value 'float8': one of float32, bfloat16, float16"),
    ("train --optimizer adam", "--optimizer: invalid value 'adam': one of adamw, sgd, lion, muon"),
    ("train --backend mpi", "--backend: invalid value 'mpi': one of auto, gloo, nccl"),
    ("train --resume yes", "argument --resume: invalid value 'yes': auto"),
    ("sample --run r --num-samples 0", "argument --num-samples: invalid value '0': must be >= 1"),
    ("sample --run r --top-p 0", "argument --top-p: invalid value '0': must be > 0 and <= 1"),
    ("sample --run r --temperature -1", "--temperature: invalid value '-1': must be >= 0"),
    ("sample --run r --checkpoint first", "argument --checkpoint: invalid choice: 'first'"),
    ("eval --run r --stride 0", "argument --stride: invalid value '0': must be >= 1"),
    ("prepare --out d --val-fraction 1", "--val-fraction: invalid value '1': must be > 0 and < 1"),
    ("train --position alibi", "--position: invalid value 'alibi': one of learned, rotary, none"),
    ("train --norm batchnorm", "--norm: invalid value 'batchnorm': one of layernorm, rmsnorm"),
    ("train --mlp silu", "--mlp: invalid value 'silu': one of gelu_tanh, gelu, relu2, swiglu, ge"),
    ("train --n-kv-head 0", "argument --n-kv-head: invalid value '0': must be >= 1"),
    ("train --rope-theta 0", "argument --rope-theta: invalid value '0': must be > 0"),
    ("train --rotary-fraction 1.5", "--rotary-fraction: invalid value '1.5': must be > 0 and <= 1"),
    ("train --norm-eps 0", "argument --norm-eps: invalid value '0': must be > 0"),
    ("train --logit-softcap 0", "argument --logit-softcap: invalid value '0': must be > 0"),
    ("train --d-mlp 2.5", "argument --d-mlp: invalid value '2.5': expected an integer"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_VALUES)
def test_bad_values_are_refused_where_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv.split())
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--device", "cuda"])
    assert "--device: invalid value 'cuda': CUDA is not available here" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("--lr 0.001 --min-lr 0.01", "--min-lr: invalid value 0.01: must be <= lr (0.001)"),
        ("--n-embd 30", "--n-embd: invalid value 30: must be a multiple of n_head (4)"),
        ("--resume --overwrite", "--overwrite: invalid value True: cannot be combined"),
        ("--n-kv-head 3", "--n-kv-head: invalid value 3: must divide n_head (4)"),
        ("--n-head 3", "--n-embd: invalid value 128: must be a multiple of n_head (3), or give"),
        (
            "--position rotary --n-embd 24 --n-head 4 --rotary-fraction 0.5",
            "--rotary-fraction: invalid value 0.5: rotary positions turn pairs of dims: "
            "int(d_head * rotary_fraction) = int(6 * 0.5) = 3 must be even and >= 2",
        ),
    ],
)
def test_options_that_disagree_are_refused(argv, message, capsys):
    assert main(["train", *argv.split()]) == 1
    assert message in capsys.readouterr().err


def _train_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


def test_every_flag_is_a_toml_key(tmp_path):
    defaults = TrainConfig().flat() | {"data": "somewhere", "resume": "auto"}
    unset = {"norm_bias": True, "mlp_bias": False, "qkv_bias": True, "n_kv_head": 2,
             "d_head": 32, "d_mlp": 64, "logit_softcap": 30.0, "init_from": "a/model",
             "rope_scaling": [8.0, 1.0, 4.0, 128], "sliding_window": 16, "window_pattern": "LG",
             "rope_local_theta": 100.0, "rope_layers": "RN", "attn_scale": 0.2,
             "attn_softcap": 50.0}  # fmt: skip
    assert {k for k, v in defaults.items() if v is None} == set(unset)
    defaults |= unset  # TOML has no None: leaving a key out leaves the option unset
    flags = [
        s[2:]
        for a in _train_parser()._actions
        for s in a.option_strings
        if s.startswith("--") and not s.startswith("--no-") and s not in ("--help", "--config")
    ]
    assert "sample-tokens" in flags and "tie-embeddings" in flags and "muon-lr" in flags
    lines = [f"{flag} = {_toml_value(defaults[flag.replace('-', '_')])}" for flag in flags]
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    cfg = TrainConfig.from_dict(load_toml(path), source=str(path))
    assert cfg.data.data == "somewhere" and cfg.run.resume is True
    assert cfg.model.gpt_config(10).n_kv_head == 2 and cfg.model.logit_softcap == 30.0
    assert cfg.model.gpt_config(10).rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 128)


def test_every_gptconfig_field_but_the_vocabulary_is_a_model_option_with_its_metadata():
    import dataclasses

    from gptfn.train import ModelOptions

    options = {f.name: f for f in dataclasses.fields(ModelOptions)}
    for f in dataclasses.fields(GPTConfig):
        if f.name == "vocab_size":
            assert f.name not in options
            continue
        assert f.name in options, f"GPTConfig.{f.name} has no gptfn train option"
        assert options[f.name].metadata == f.metadata, f.name  # help, choices, bounds: one source
    flags = {s for a in _train_parser()._actions for s in a.option_strings}
    missing = [
        f.name
        for f in dataclasses.fields(GPTConfig)[1:]
        if "--" + f.name.replace("_", "-") not in flags
    ]
    assert not missing, missing


def test_tuple_options_parse_from_flags_and_are_checked():
    args = _train_parser().parse_args(["--rope-scaling", "8,1,4,8192", "--position", "rotary"])
    assert args.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    args = _train_parser().parse_args(["--rope-scaling", "linear,8", "--position", "rotary"])
    assert args.rope_scaling == RopeScaling("linear", 8.0)
    with pytest.raises(SystemExit):
        _train_parser().parse_args(["--rope-scaling", "8,1"])
    with pytest.raises(OptionError, match=r"rope_scaling: .* needs position='rotary'"):
        TrainConfig().replace(recipe="gpt2", rope_scaling=[8.0, 1.0, 4.0, 8192])


def test_architecture_keys_in_toml_reach_the_model(tmp_path):
    path = tmp_path / "llama.toml"
    path.write_text('recipe = "gpt2"\n[model]\nposition = "rotary"\nnorm = "rmsnorm"\n'
                    'mlp = "swiglu"\nn-kv-head = 2\nqk-norm = true\ntie-embeddings = false\n'
                    'bias = false\n'
                    "qkv_bias = true\nrope-theta = 500\n")  # fmt: skip
    model = TrainConfig.from_dict(load_toml(path)).model.gpt_config(vocab_size=50)
    assert model == GPTConfig(
        vocab_size=50, block_size=128, n_layer=4, n_head=4, n_embd=128, position="rotary",
        norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True, tie_embeddings=False,
        bias=False, qkv_bias=True, rope_theta=500.0,
    )  # fmt: skip
    assert (model.mlp_bias, model.norm_bias, model.d_head) == (False, False, 32)
    path.write_text('[model]\nposition = "alibi"\n')
    with pytest.raises(OptionError, match="position: invalid value 'alibi': one of learned, rot"):
        TrainConfig.from_dict(load_toml(path), source=str(path))


def test_toml_sections_and_flags_override(tmp_path, monkeypatch):
    path = tmp_path / "t.toml"
    path.write_text('[model]\nn-layer = 3\n[optimizer]\noptimizer = "sgd"\nmomentum = 0.5\n'
                    '[data]\ndata = "here"\n[run]\nsample_tokens = 0\n')  # fmt: skip
    cfg = TrainConfig.from_dict(load_toml(path))
    assert (cfg.model.n_layer, cfg.optimizer.optimizer, cfg.optimizer.momentum) == (3, "sgd", 0.5)
    assert cfg.data.data == "here" and cfg.run.sample_tokens == 0
    seen = {}
    monkeypatch.setattr("gptfn.train.train", lambda cfg: seen.setdefault("cfg", cfg) and 1 / 0)
    with pytest.raises(ZeroDivisionError):  # stop before training; the config was built
        main(["train", "--config", str(path), "--n-layer", "2"])
    assert seen["cfg"].model.n_layer == 2 and seen["cfg"].optimizer.momentum == 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr = 'fast'\n", "{path}: lr: invalid value 'fast': expected a number, got str"),
        ("[run]\nmax-steps = 1.5\n", "{path}: max_steps: invalid value 1.5: expected an integer"),
        ("compile = 1\n", "{path}: compile: invalid value 1: expected true or false"),
        ("[model]\nlr = 0.1\n", "{path}: key 'lr' belongs in [optimizer], not [model]"),
        (
            "learning-rate = 0.1\n",
            "{path}: unknown option 'learning_rate'; valid: block_size, n_layer",
        ),
        ("lr = 0.1\nlr = 0.2\n", "{path}: not valid TOML: Cannot overwrite a value (at line 2"),
        ("lr = \n", "{path}: not valid TOML: Invalid value (at line 1, column 6)"),
        ("dropout = 2.0\n", "{path}: dropout: invalid value 2.0: must be >= 0 and < 1"),
    ],
)
def test_toml_errors_name_the_file_and_key(text, message, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 1
    assert message.format(path=path) in capsys.readouterr().err


def test_sections_hold_every_option_once_with_help():
    cfg = TrainConfig().replace(recipe="gpt2")
    assert (cfg.model.n_layer, cfg.optimizer.lr, cfg.data.batch_size, cfg.run.max_steps) == (
        4, 2e-3, 32, 2500,
    )  # fmt: skip
    assert isinstance(cfg.optimizer, OptimizerConfig)
    names = [f.name for cls in TrainConfig.SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) and "extra" not in names
    for cls in TrainConfig.SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata["help"] and "\n" not in f.metadata["help"], f.name
    with pytest.raises(OptionError, match="lr: invalid value 0"):
        TrainConfig.from_dict({"lr": 0})
    with pytest.raises(OptionError, match="n_layer: invalid value 0"):
        cfg.replace(n_layer=0)
    assert cfg.replace(tie_embeddings=False).model.gpt_config(50).tie_embeddings is False
    model = cfg.replace(n_layer=3, n_head=2, n_embd=8, block_size=9, bias=False).model
    assert model.gpt_config(50) == GPTConfig(50, 9, 3, 2, 8, bias=False)


def test_compile_is_refused_where_torch_cannot_compile_the_step(monkeypatch):
    monkeypatch.setattr("gptfn.train.options.torch_version", lambda: (2, 11))
    with pytest.raises(OptionError, match=r"compile: invalid value True: .* needs PyTorch 2\.12"):
        TrainConfig.from_dict({"compile": True})
    assert TrainConfig.from_dict({"compile": False}).run.compile is False


def test_recipes_set_defaults_and_options_given_by_name_win(tmp_path, monkeypatch):
    from gptfn.train.options import RECIPES

    speedrun, gpt2 = TrainConfig(), TrainConfig().replace(recipe="gpt2")
    assert speedrun.run.recipe == "speedrun" and gpt2.run.recipe == "gpt2"
    assert RECIPES["speedrun"].keys() == RECIPES["gpt2"].keys()
    for name, value in RECIPES["speedrun"].items():  # every recipe value reaches its option
        assert speedrun.flat()[name] == value and gpt2.flat()[name] == RECIPES["gpt2"][name]
    assert speedrun.flat() != gpt2.flat()
    assert gpt2.model == type(gpt2.model)() and gpt2.optimizer == OptimizerConfig()  # 2019
    name, value = next(iter(RECIPES["speedrun"].items()))
    mixed = TrainConfig().replace(recipe="gpt2", **{name: value})  # a flag beats the recipe
    assert mixed.flat()[name] == value and mixed.flat()["recipe"] == "gpt2"
    path = tmp_path / "r.toml"
    path.write_text(f'recipe = "gpt2"\n{name} = {_toml_value(value)}\n')
    from_toml = TrainConfig.from_dict(load_toml(path))
    assert from_toml.flat() == mixed.flat()
    # a recipe flag over a TOML file: the file's own keys still win over the recipe
    assert from_toml.replace(recipe="speedrun").flat() == speedrun.flat()
    path.write_text(f"{name} = {_toml_value(RECIPES['gpt2'][name])}\n")
    assert (
        TrainConfig.from_dict(load_toml(path)).replace(recipe="speedrun").flat()[name]
        == (RECIPES["gpt2"][name])
    )
    seen = {}
    monkeypatch.setattr("gptfn.train.train", lambda cfg: seen.setdefault("cfg", cfg) and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["train", "--recipe", "gpt2", "--lr", "0.003"])
    assert seen["cfg"].flat() == gpt2.replace(lr=0.003).flat()


def test_a_bad_recipe_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "nanogpt"])
    assert "--recipe: invalid value 'nanogpt': one of speedrun, gpt2" in (capsys.readouterr().err)
    with pytest.raises(OptionError, match="recipe: invalid value 'x': one of speedrun, gpt2"):
        TrainConfig.from_dict({"run": {"recipe": "x"}})
