"""``--optimizer module.path:function``: a user's optimizer imported by name, called with the
schedule and the options it names, checked (spec, import, attribute, callable, signature,
result), stored in the checkpoint and re-imported on resume. Tiny runs, in-process."""

from __future__ import annotations

import sys
import textwrap

import optree
import pytest
import torch

import gptfn.optim as optim
import gptfn.train.optimizer_options as train_options
from gptfn.checkpoint import load_run, read_meta
from gptfn.cli import main
from gptfn.train import TrainConfig, train
from gptfn.train.options import load_toml
from gptfn.train.user_optimizer import load_user_optimizer

MOD = "gptfn_test_user_opts"
USER_MODULE = """
import types

import torch

import gptfn.optim as optim

calls = []


def nesterov(learning_rate, momentum, total_steps, beta1=0.5):
    lr = float(learning_rate(torch.tensor(5)))
    calls.append(dict(lr=lr, momentum=momentum, total_steps=total_steps, beta1=beta1))
    return optim.sgd(learning_rate, momentum=momentum, nesterov=True)


def everything(learning_rate, **options):
    calls.append(sorted(options))
    return optim.sgd(learning_rate)


def first_named_lr(lr, *, weight_decay):  # the first argument gets the schedule, whatever its name
    calls.append(dict(schedule=callable(lr), weight_decay=weight_decay))
    return optim.sgd(lr)


class Factories:
    @staticmethod
    def plain(learning_rate):
        tx = optim.sgd(learning_rate)
        return types.SimpleNamespace(init=tx.init, update=tx.update)  # optax-style: accepted


NOT_CALLABLE = 3


def returns_dict(learning_rate):
    return {"init": None, "update": None}


def needs_more(learning_rate, foo):
    return optim.sgd(learning_rate)
"""
TINY = dict(
    n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_interval=2, eval_steps=2,
    log_interval=1, warmup_steps=2, progress=False, sample_tokens=0,
)  # fmt: skip


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    """The module ``gptfn_test_user_opts`` (and a broken one) on the Python path."""
    root = tmp_path_factory.mktemp("user_opts")
    (root / f"{MOD}.py").write_text(USER_MODULE)
    (root / "gptfn_test_broken_opts.py").write_text("raise RuntimeError('boom at import')\n")
    sys.path.insert(0, str(root))
    yield sys.modules.get(MOD) or __import__(MOD)
    sys.path.remove(str(root))


def tiny(**options) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **options})


def test_a_user_optimizer_trains_as_the_same_builtin_does(user_module, data_dir, tmp_path):
    common = dict(data=str(data_dir), max_steps=3, lr=0.05, min_lr=0.01, momentum=0.8)
    user_module.calls.clear()
    train(tiny(out=str(tmp_path / "user"), optimizer=f"{MOD}:nesterov", **common))
    train(tiny(out=str(tmp_path / "builtin"), optimizer="sgd", **common))
    ours, theirs = load_run(tmp_path / "user")[0], load_run(tmp_path / "builtin")[0]
    assert all(torch.equal(a, b) for a, b in zip(*map(optree.tree_leaves, (ours, theirs))))
    expected_lr = float(train_options.lr_schedule(tiny(**common).optimizer, 3)(torch.tensor(5)))
    assert user_module.calls[-1] == dict(lr=expected_lr, momentum=0.8, total_steps=3, beta1=0.9)
    meta = read_meta(tmp_path / "user" / "last.safetensors")
    assert meta["train"]["optimizer"] == f"{MOD}:nesterov"


def test_the_options_it_names_and_only_those(user_module):
    cfg = train_options.OptimizerConfig(optimizer=f"{MOD}:everything")
    user_module.calls.clear()
    train_options.make_optimizer(cfg, total_steps=7)
    names = {"lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "momentum"}
    assert set(user_module.calls[0]) == names | {
        "muon_lr",
        "muon_momentum",
        "muon_momentum_warmup",
        "grad_clip",
        "total_steps",
    }
    train_options.make_optimizer(
        cfg.__class__(optimizer=f"{MOD}:first_named_lr", weight_decay=0.3), 7
    )
    assert user_module.calls[1] == dict(schedule=True, weight_decay=0.3)
    tx = train_options.make_optimizer(
        train_options.OptimizerConfig(optimizer=f"{MOD}:Factories.plain"), 7
    )
    assert isinstance(tx, optim.GradientTransformation)


def test_resume_reimports_the_same_spec_and_refuses_another(user_module, data_dir, tmp_path):
    common = dict(data=str(data_dir), lr=0.05, min_lr=0.01, eval_interval=2, warmup_steps=1)
    spec = f"{MOD}:nesterov"
    train(tiny(out=str(tmp_path / "straight"), optimizer=spec, max_steps=4, **common))
    train(tiny(out=str(tmp_path / "resumed"), optimizer=spec, max_steps=2, **common))
    for other in ("sgd", f"{MOD}:everything"):
        refusal = rf"with --optimizer {spec}, this run asks for --optimizer {other}; give "
        with pytest.raises(ValueError, match=refusal + rf"--optimizer {spec} to continue it"):
            again = dict(optimizer=other, max_steps=4, resume=True)
            train(tiny(out=str(tmp_path / "resumed"), **again, **common))
    train(tiny(out=str(tmp_path / "resumed"), optimizer=spec, max_steps=4, resume=True, **common))
    straight, resumed = load_run(tmp_path / "straight")[0], load_run(tmp_path / "resumed")[0]
    assert all(torch.equal(a, b) for a, b in zip(*map(optree.tree_leaves, (straight, resumed))))


BAD_SPECS = [
    ("adam", "invalid value 'adam': one of adamw, sgd, lion, muon, or module.path:function"),
    (f"{MOD}:", "is written module.path:function (e.g. mypkg.mymodule:make_tx)"),
    (f"{MOD}:a:b", "is written module.path:function"),
    ("9lives:make", "is written module.path:function"),
    ("gptfn_no_such_module:make", "cannot import module 'gptfn_no_such_module': No module named"),
    (
        "gptfn_test_broken_opts:make",
        "importing module 'gptfn_test_broken_opts' failed: RuntimeError: boom at import",
    ),
    (f"{MOD}:missing", f"module '{MOD}' ("),
    (f"{MOD}:Factories.nothing", "has no attribute 'Factories.nothing'"),
    (f"{MOD}:NOT_CALLABLE", "NOT_CALLABLE in module 'gptfn_test_user_opts' is a int, not a func"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_bad_specs_are_refused_where_parsed(spec, message, user_module, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--optimizer", spec])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --optimizer: invalid value '{spec}': " in err and message in err, err
    with pytest.raises(train_options.OptionError, match="optimizer: invalid value"):
        train_options.OptimizerConfig(optimizer=spec)  # Python: the same check


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("returns_dict", "returned a dict, not a GradientTransformation (init(params) -> state"),
        (
            "needs_more",
            "cannot be called as needs_more(schedule, **options): missing a required "
            "argument: 'foo' (it gets the learning-rate schedule first, then",
        ),
    ],
)
def test_what_the_function_does_is_checked_before_anything_is_written(
    name, message, user_module, data_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", "--data", str(data_dir), "--out", str(out), "--optimizer", f"{MOD}:{name}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"gptfn train: error: --optimizer: invalid value '{MOD}:{name}': " in err, err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_toml_names_a_user_optimizer(user_module, tmp_path, capsys):
    path = tmp_path / "t.toml"
    path.write_text(f'[optimizer]\noptimizer = "{MOD}:nesterov"\nmomentum = 0.5\n')
    assert TrainConfig.from_dict(load_toml(path)).optimizer.optimizer == f"{MOD}:nesterov"
    path.write_text(f'[optimizer]\noptimizer = "{MOD}:missing"\n')
    assert main(["train", "--config", str(path)]) == 1
    assert f"{path}: optimizer: invalid value '{MOD}:missing': module " in capsys.readouterr().err


def test_a_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    (tmp_path / "gptfn_test_here_opts.py").write_text(
        textwrap.dedent("""
        import gptfn.optim as optim
        def make(learning_rate):
            return optim.sgd(learning_rate)
        """)
    )
    monkeypatch.chdir(tmp_path)  # as the installed `gptfn` command, whose path lacks the cwd
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert callable(load_user_optimizer("gptfn_test_here_opts:make"))
    assert str(tmp_path) not in sys.path  # the path is left as it was
