"""Compiled decoding: ``generate(..., compile=True)`` and ``gptfn sample --compile`` give the
same tokens as eager decoding (seeded sampling, greedy, ragged batches, EOS), with one graph
for prefill and one for every decode step (``fullgraph=True``, no recompilation when the seed,
the prompts' contents or the temperature change); the sampler
and the one-query attention path they run, checked without compiling.

All compiled tests share one tiny model (a two-step run, which the CLI test samples too), so
the whole file compiles two small graphs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import gptfn
from gptfn.checkpoint import load_run
from gptfn.cli import main
from gptfn.data import prepare, shakespeare
from gptfn.generation import sample_from_uniform
from gptfn.model import decode_kernels
from gptfn.model.attention import _one_query_attention, attend
from gptfn.model.layers import _streams_better, linear
from gptfn.train import train
from gptfn.train.options import TrainConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile_decode")
    (root / "plays.txt").write_text(shakespeare()[:5_000])
    prepare(root / "plays.txt", root / "char", "char")
    options = dict(data=str(root / "char"), out=str(root / "run"), n_layer=1, n_head=2)
    options |= dict(n_embd=16, block_size=16, batch_size=2, max_steps=2, eval_steps=1)
    train(TrainConfig.from_dict(options | dict(progress=False, warmup_steps=1, sample_tokens=0)))
    return root / "run"


@pytest.fixture(scope="module")
def params(run):
    return load_run(run)[0]


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_generate_is_eager_generate_with_one_decode_graph(params):
    prompts = [[20, 21], [22], [23, 24]]  # ragged: the middle row is left-padded
    sampling = dict(temperature=0.8, top_k=20, top_p=0.95, seed=1)  # as the CLI test's
    before = graphs()
    compiled = gptfn.generate(params, prompts, 6, compile=True, **sampling)
    assert graphs() - before == 2  # prefill + ONE decode graph for all five decode steps
    assert compiled == gptfn.generate(params, prompts, 6, **sampling)
    assert all(len(row) == 6 for row in compiled)
    # new seed, new prompt contents, EOS: same shapes, so no recompilation (it would raise)
    eos, reseeded, others = compiled[0][2], sampling | {"seed": 2}, [[30, 31], [32], [33, 34]]
    greedy = sampling | {"temperature": 0.0}  # the temperature is a tensor: greedy too
    with torch.compiler.set_stance("fail_on_recompile"):
        other = gptfn.generate(params, others, 6, compile=True, **reseeded)
        stopped = gptfn.generate(params, prompts, 6, compile=True, eos_token_id=eos, **sampling)
        argmax = gptfn.generate(params, prompts, 6, compile=True, **greedy)
    assert argmax == gptfn.generate(params, prompts, 6, temperature=0)
    assert other == gptfn.generate(params, others, 6, **reseeded)
    assert other != compiled
    assert stopped == gptfn.generate(params, prompts, 6, eos_token_id=eos, **sampling)
    assert stopped[0] == compiled[0][:3]  # row 0 stopped at its EOS, the others did not
    assert graphs() == before + 2


def test_sample_compile_flag_prints_the_same_samples(run, capsys):
    sample = ["sample", "--run", str(run), "--prompt", "RO", "--num-samples", "3", "--seed", "1",
              "--max-new-tokens", "6", "--top-k", "20", "--top-p", "0.95"]  # fmt: skip
    assert main(sample) == 0
    eager = capsys.readouterr().out
    assert main([*sample, "--compile"]) == 0
    assert capsys.readouterr().out == eager


def test_sampling_from_uniforms_follows_the_distribution():
    logits = torch.tensor([2.0, 0.0, -1.0, 1.0, float("-inf"), 0.5])
    probs = logits.softmax(-1)
    n = 10_000
    grid = (torch.arange(n) + 0.5) / n  # evenly spread uniforms: counts = n * probs (+-1)
    draws = sample_from_uniform(logits.expand(n, -1), grid)
    counts = torch.bincount(draws, minlength=6).float()
    assert (counts - n * probs).abs().max() <= 1
    edges = torch.tensor([0.0, 1 - 2**-24])  # extreme uniforms never pick a masked token
    top2 = sample_from_uniform(logits.expand(2, -1), edges, top_k=2)
    assert top2.tolist() == [0, 3]
    assert sample_from_uniform(logits[None], torch.tensor([0.9]), temperature=0).item() == 0


def test_one_query_attention_equals_the_reference():
    gen = torch.Generator().manual_seed(0)
    for heads, kv_heads in ((4, 4), (4, 2)):
        q = torch.randn(3, 1, heads, 8, generator=gen)
        k, v = (torch.randn(3, 10, kv_heads, 8, generator=gen) for _ in "kv")
        mask = torch.rand(3, 1, 1, 10, generator=gen) > 0.3
        mask[..., 0] = True
        heads_first = (t.transpose(1, 2) for t in (q, k, v))  # the layout attend hands it
        heads_first = list(heads_first)
        fast = _one_query_attention(*heads_first, mask).transpose(1, 2)
        reference = attend(q, k, v, mask=mask, impl="reference")
        torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-5)
        compiled = torch.compile(_one_query_attention, fullgraph=True, dynamic=False)
        fused = compiled(*heads_first, mask).transpose(1, 2)  # the summed-products form
        torch.testing.assert_close(fused, reference, atol=1e-6, rtol=1e-5)


def _kernel_or_skip() -> None:
    if not decode_kernels.enable():
        pytest.skip("no AVX512-BF16 CPU or no C++ build here: the decode kernel is not built")


def test_gptfn_gemv_0_keeps_inductors_kernel():
    code = "from gptfn.model import decode_kernels as d; print(d.enable(), d.available())"
    env = dict(os.environ, GPTFN_GEMV="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("shape", [(512, 2048), (7, 100), (13, 2053), (4, 64), (1, 1)])
def test_the_bfloat16_decode_kernel_equals_a_float64_matrix_vector_product(shape):
    _kernel_or_skip()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen).to(torch.bfloat16)  # four-row blocks and tails
    x = torch.randn(shape[1], generator=gen).to(torch.bfloat16)
    got, want = decode_kernels.gemv_bf16(w, x), w.double() @ x.double()
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("heads, kv_heads, d_head, slots", [(32, 8, 64, 1024), (4, 4, 32, 37)])
def test_the_bfloat16_attention_kernel_equals_float64_attention(heads, kv_heads, d_head, slots):
    _kernel_or_skip()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, d_head, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(2, slots, kv_heads, d_head, generator=gen).to(torch.bfloat16) for _ in "kv")
    mask = torch.rand(2, slots, generator=gen) > 0.4  # slots not a multiple of 16 in the 2nd
    mask[:, 0] = True
    got = decode_kernels.attend_one_bf16(q, k, v, mask, 0.3)
    want = attend(
        q[:, None].double(), k.double(), v.double(), mask=mask[:, None, None], impl="reference",
        scale=0.3,
    )[:, 0]  # fmt: skip
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_a_compiled_bfloat16_decode_step_uses_the_kernels_and_agrees_with_eager():
    _kernel_or_skip()
    cfg = gptfn.GPTConfig(64, 32, 2, 4, 128, n_kv_head=2, position="rotary", mlp="swiglu")
    params = gptfn.init(cfg, seed=0, dtype=torch.bfloat16)
    decode = gptfn.generation.decode_layout(params)
    cache = gptfn.generation.init_cache(decode, 1, 16)
    _, cache = gptfn.generation.extend(decode, torch.tensor([[1, 2, 3]]), cache)
    token = torch.tensor([[4]])
    step = torch.compile(gptfn.generation.extend, fullgraph=True, dynamic=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        compiled, _ = step(decode, token, {k: v for k, v in cache.items()})
    eager, _ = gptfn.generation.extend(decode, token, cache)
    called = {e.key for e in prof.key_averages()}
    assert {"gptfn::gemv_bf16", "gptfn::attend_one_bf16"} <= called
    torch.testing.assert_close(compiled.float(), eager.float(), atol=0.05, rtol=0.02)


def test_compiled_one_row_linear_sums_products_as_f_linear_would():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=gen).to(torch.bfloat16)  # [out, in]
    x, bias = torch.randn(1, 1, 40, generator=gen), torch.randn(24, generator=gen)
    x, bias = x.to(torch.bfloat16), bias.to(torch.bfloat16)
    assert _streams_better(x, weight) and not _streams_better(x.expand(2, 1, 40), weight)
    compiled = torch.compile(linear, fullgraph=True, dynamic=False)
    for b in (None, bias):
        want = torch.nn.functional.linear(
            x.float(), weight.float(), None if b is None else b.float()
        )
        got = compiled(x, weight, b)
        assert got.shape == (1, 1, 24) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


def test_a_compiled_bfloat16_decode_step_calls_no_matrix_kernel():
    """Every projection of a one-token step (w_o with its two input axes included) streams
    its weight inside the fused kernel; a regression falls back to ``mm`` for one of them."""
    cfg = gptfn.GPTConfig(64, 32, 1, 4, 32, n_kv_head=2, position="rotary", mlp="swiglu")
    params = gptfn.init(cfg, seed=0, dtype=torch.bfloat16)

    def mm_calls(new_tokens: int) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            gptfn.generate(params, [[1, 2, 3]], new_tokens, temperature=0, compile=True)
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))

    mm_calls(1)  # compile first
    assert mm_calls(4) == mm_calls(1)  # three more decode steps, no more matrix kernels


def test_an_eager_bfloat16_decode_step_takes_the_kernels_only_without_gradients():
    _kernel_or_skip()
    cfg = gptfn.GPTConfig(64, 256, 2, 8, 256, n_kv_head=2, position="rotary", mlp="swiglu")
    params = gptfn.generation.decode_layout(gptfn.init(cfg, seed=0, dtype=torch.bfloat16))
    cache = gptfn.generation.init_cache(params, 1, 256)  # 8 heads x 256 keys: explicit path
    prompt = torch.randint(0, 64, (1, 255), generator=torch.Generator().manual_seed(0))
    _, cache = gptfn.generation.extend(params, prompt, cache)
    kernels = {"gptfn::gemv_bf16", "gptfn::attend_one_bf16"}

    def step(tree):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            logits, _ = gptfn.generation.extend(tree, torch.tensor([[4]]), dict(cache))
        return logits, {e.key for e in prof.key_averages()} & kernels

    with torch.no_grad():
        fast, used = step(params)
    assert used == kernels
    differentiable = {k: v for k, v in params.items()}  # the same tree, its weights to train
    differentiable["blocks"] = [
        {
            name: {k: w.detach().requires_grad_() for k, w in part.items()}
            for name, part in b.items()
        }
        for b in params["blocks"]
    ]
    slow, used = step(differentiable)
    assert not used and slow.requires_grad  # no derivative in the kernels: torch's ops
    torch.testing.assert_close(fast.float(), slow.float(), atol=0.05, rtol=0.02)
