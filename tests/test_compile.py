"""``torch.compile(fullgraph=True)`` of gptfn's pure functions: one graph each, equal to eager,
and no recompilation when only values change (another batch, a later step, a new learning rate).

Compiling is slow on CI's two cores, so inductor (the default backend) compiles only what
``gptfn train --compile`` and ``gptfn eval --compile`` run, in the last test. The ten-step test
uses ``aot_eager`` (AOTAutograd's trace of forward and backward, no code generation); the others
use dynamo alone (``backend="eager"``): graph breaks and recompiles are decided by dynamo whatever
the backend, and running its captured graph checks that tracing kept the function's meaning
(no value baked in as a constant).
"""

from __future__ import annotations

import json

import optree
import pytest
import torch
from conftest import random_tokens

import gptfn
import gptfn.optim as optim
from gptfn.optim import inject_hyperparams, set_hyperparams
from gptfn.testing import assert_compile_matches_eager
from gptfn.train.options import COMPILE_FLOOR, torch_version

pytestmark = pytest.mark.skipif(
    torch_version() < COMPILE_FLOOR, reason="compiling the step needs PyTorch 2.12 or newer"
)

VOCAB = 31
GPT2 = gptfn.GPTConfig(VOCAB, 8, 1, 2, 16)
LLAMA = gptfn.GPTConfig(
    VOCAB, 8, 1, 4, 16, n_kv_head=2, position="rotary", norm="rmsnorm", mlp="swiglu", bias=False,
    tie_embeddings=False,
)  # fmt: skip
NEOX = gptfn.GPTConfig(VOCAB, 8, 1, 2, 16, parallel_residual=True, position="rotary")
FAST = {"backend": "eager"}


def _batch(seed: int, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return random_tokens(VOCAB, rows, 8, seed), random_tokens(VOCAB, rows, 8, seed + 1)


def _forward_after(step):
    """The step, returning the loss and the new model's logits: compare functions, not raw
    params (the key bias has a true gradient of zero, so Adam turns float noise there into
    lr-sized steps that do not change the output)."""

    def run(params, state, batch):
        params, state, metrics = step(params, state, batch)
        return metrics["loss"], gptfn.forward(params, batch[0])

    return run


def test_forward_and_loss_of_each_architecture_are_one_graph():
    for cfg in (GPT2, LLAMA, NEOX):
        params = gptfn.init(cfg, seed=0)
        assert_compile_matches_eager(
            gptfn.loss, params, *_batch(0), more_args=[(params, *_batch(2))], **FAST
        )


def test_ten_compiled_steps_equal_eager_without_recompiling():
    """Accumulation, clipping, chain, inject_hyperparams, a schedule, masked decay."""
    sched = optim.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10, 1e-3)
    adamw = inject_hyperparams(optim.adamw)(learning_rate=sched, weight_decay=0.1)
    tx = optim.chain(optim.clip_by_global_norm(0.5), adamw)
    step = gptfn.make_train_step(tx, accum_steps=2)
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    params = gptfn.init(GPT2, seed=0)
    eager = (params, tx.init(params))
    fast = (params, tx.init(params))
    lrs = []
    for i in range(10):
        batch = _batch(10 * i)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            *fast, fast_metrics = compiled(*fast, batch)
        *eager, metrics = step(*eager, batch)
        torch.testing.assert_close(fast_metrics, metrics, atol=1e-5, rtol=1e-4)
        lrs.append(float(fast[1][1].hyperparams["learning_rate"]))
    assert len(set(lrs)) == 10 and int(fast[1][1].count) == 10  # lr and count changed each step
    tokens = _batch(99)[0]
    torch.testing.assert_close(
        gptfn.forward(fast[0], tokens), gptfn.forward(eager[0], tokens), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    "make_tx, dtype",
    [
        (lambda: optim.muon(1e-2, adam_learning_rate=1e-3), "bfloat16"),
        (lambda: optim.loss_scaling(optim.masked(optim.adamw(1e-3), optim.matrices)), "float16"),
    ],
    ids=["muon-bf16-autocast", "masked-fp16-loss-scaling"],
)
def test_step_with_each_optimizer_and_precision_is_one_graph(make_tx, dtype):
    tx = make_tx()
    params = gptfn.init(LLAMA if dtype == "bfloat16" else GPT2, seed=0)
    run = _forward_after(gptfn.make_train_step(tx, dtype=dtype))
    state = tx.init(params)
    # eager steps take gradients through torch.autograd, compiled ones through torch.func.vjp:
    # the same formulas, but bf16 rounding (then Newton-Schulz) moves logits by ~3e-5
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == "bfloat16" else {}
    assert_compile_matches_eager(
        run, params, state, _batch(0), more_args=[(params, state, _batch(5))], **FAST, **tolerance
    )


def test_per_example_grads_and_a_vmapped_ensemble_step_are_one_graph():
    params = gptfn.init(GPT2, seed=0)
    assert_compile_matches_eager(gptfn.per_example_grads, params, *_batch(0), **FAST)
    tx = inject_hyperparams(optim.adamw)(learning_rate=1e-3)
    stacked = gptfn.tree.stack([gptfn.init(GPT2, seed=s) for s in range(2)])
    state = torch.func.vmap(tx.init)(stacked)
    state = set_hyperparams(state, learning_rate=torch.tensor([1e-3, 1e-2]))
    ensemble_step = torch.func.vmap(_forward_after(gptfn.make_train_step(tx)), in_dims=(0, 0, None))
    assert_compile_matches_eager(
        ensemble_step,
        stacked,
        state,
        _batch(0),
        more_args=[(stacked, state, _batch(7))],
        **FAST,
    )


def test_hooks_survive_compilation():
    """run_with_cache captures and run_with_patches patches inside one compiled graph
    (TransformerLens hooks do not survive torch.compile: its issue #413)."""
    params = gptfn.init(GPT2, seed=0)

    def capture_and_patch(params, tokens, scale):
        _, cache = gptfn.run_with_cache(params, tokens, ["blocks.0.attn.pattern", "ln_f.out"])
        patched = gptfn.run_with_patches(params, tokens, {"blocks.0.mlp.out": lambda a: a * scale})
        return cache, patched

    tokens = _batch(0)[0]
    (cache, patched) = assert_compile_matches_eager(
        capture_and_patch, params, tokens, torch.tensor(0.5), **FAST
    )(params, tokens, torch.tensor(0.5))
    assert set(cache) == {"blocks.0.attn.pattern", "ln_f.out"}
    assert not torch.allclose(patched, gptfn.forward(params, tokens))  # the patch took effect


def test_hvp_is_one_graph():
    params = gptfn.init(GPT2, seed=0)
    tokens, targets = _batch(0)
    v = optree.tree_map(torch.ones_like, params)
    assert_compile_matches_eager(
        lambda p, v: gptfn.hvp(lambda q: gptfn.loss(q, tokens, targets), p, v),
        params,
        v,
        atol=1e-4,
        **FAST,
    )


def test_assert_compile_matches_eager_catches_graph_breaks_and_recompiles():
    def breaks(x):
        torch._dynamo.graph_break()  # what an untraceable call would do
        return x + 1

    with pytest.raises(AssertionError, match=r"torch\.compile failed"):
        assert_compile_matches_eager(breaks, torch.ones(2), backend="eager")

    def by_shape(x):
        return x * x.shape[0] if x.shape[0] < 3 else x  # a new shape: a new graph

    with pytest.raises(AssertionError, match=r"recompiled for more_args\[0\]"):
        assert_compile_matches_eager(
            by_shape, torch.ones(2), more_args=[(torch.ones(5),)], backend="eager"
        )


def test_train_and_eval_compile_equal_eager(tmp_path, capsys):
    """``train --compile``: the loss (with its backward) and the evaluation, one graph each;
    ``eval --compile``."""
    from gptfn.checkpoint import load_run
    from gptfn.cli import main
    from gptfn.data import prepare, shakespeare
    from gptfn.train import TrainConfig, train

    (tmp_path / "plays.txt").write_text(shakespeare()[:5_000])
    prepare(tmp_path / "plays.txt", tmp_path / "char", "char")
    common = dict(
        data=str(tmp_path / "char"), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
        max_steps=4, eval_interval=2, eval_steps=2, warmup_steps=1, progress=False,
    )  # fmt: skip
    runs = {}
    for compile in (False, True):
        out = str(tmp_path / f"compile-{compile}")
        runs[compile] = train(TrainConfig.from_dict({**common, "out": out, "compile": compile}))
    printed = capsys.readouterr().out
    assert "compiled the train loss and its gradient in" in printed
    assert "compiled the evaluation in" in printed
    assert runs[True]["best_val_loss"] == pytest.approx(runs[False]["best_val_loss"], abs=1e-4)
    assert runs[True]["last"]["train_loss"] == pytest.approx(
        runs[False]["last"]["train_loss"], abs=1e-4
    )
    tokens = _batch(0)[0] % 10
    eager, compiled = (load_run(tmp_path / f"compile-{c}")[0] for c in (False, True))
    torch.testing.assert_close(
        gptfn.forward(compiled, tokens), gptfn.forward(eager, tokens), atol=1e-4, rtol=1e-4
    )
    reports = []
    for flags in ([], ["--compile"]):
        assert main(["eval", "--run", str(tmp_path / "compile-True"), "--json", *flags]) == 0
        printed = capsys.readouterr().out  # with --compile: the warm-up line, then the JSON
        reports.append(json.loads(printed[printed.index("{") :]))
    assert reports[1]["tokens"] == reports[0]["tokens"]
    assert reports[1]["mean_nll"] == pytest.approx(reports[0]["mean_nll"], abs=1e-5)


def test_frozen_heap_sets_the_heap_aside_and_gives_it_back():
    """Inside, what was alive on entry is out of the collector's reach (a dropped cycle
    survives a collection); after, it is collected again; nested or inside a caller's own
    freeze, nothing is unfrozen early."""
    import gc
    import weakref

    from gptfn.compiling import frozen_heap

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    cycle = Node()
    cycle.me = cycle  # garbage only a collection can free
    alive = weakref.ref(cycle)
    with frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        del cycle
        with frozen_heap():  # counts may only fall (a frozen object freed by its refcount)
            assert gc.get_freeze_count() <= frozen  # nothing frozen a second time
        assert gc.get_freeze_count() > 0  # nothing unfrozen early
        gc.collect()
        assert alive() is not None  # frozen: not scanned
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None  # handed back: nothing kept
    gc.freeze()  # a caller's own freeze is left as it was
    try:
        theirs = gc.get_freeze_count()
        with frozen_heap():
            pass
        assert gc.get_freeze_count() == theirs
    finally:
        gc.unfreeze()


def test_jit_and_the_loops_compiled_step_make_their_first_call_on_a_frozen_heap(monkeypatch):
    """``jit``'s first call (the compilation) and, under ``--compile``, the loop's first step
    (which compiles the backward too) run in ``frozen_heap``; later calls do not."""
    import gc

    from gptfn.compiling import jit
    from gptfn.distributed import DistEnv
    from gptfn.train import TrainConfig, make_optimizer
    from gptfn.train.loop import _make_step

    seen: list[int] = []

    def loss(params, *args, **kwargs):
        seen.append(gc.get_freeze_count())
        return gptfn.loss(params, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the wrappers, not inductor
    compiled = jit(loss, "the loss", report=None)
    params = gptfn.init(gptfn.GPTConfig(10, 8, 1, 2, 8))
    batch = tuple(t % 10 for t in _batch(0))
    compiled(params, *batch), compiled(params, *batch)
    assert seen[0] > 0 and seen[1] == 0
    seen.clear()
    for compile in (True, False):
        cfg = TrainConfig.from_dict({"compile": compile, "n_layer": 1, "block_size": 8})
        tx = make_optimizer(cfg.optimizer, 10)
        step = _make_step(cfg, DistEnv(), tx, loss, None)
        state = params, tx.init(params)
        state = step(*state, batch)[:2]
        step(*state, batch)
    assert seen[0] > 0 and seen[1:] == [0, 0, 0]
