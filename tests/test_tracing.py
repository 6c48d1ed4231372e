"""gptfn.tracing: the one place that asks "inside a torch.func transform? being compiled?"."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from gptfn import tracing


def _answers(x: torch.Tensor) -> torch.Tensor:
    """The module's answers, encoded in a tensor so that they survive transforms and compile."""
    flags = (tracing.transform_depth(), tracing.needs_math_sdpa(), tracing.is_traced(x))
    return x * 0 + torch.tensor([float(f) for f in flags])


def _grad(x):
    return torch.func.grad(lambda y: (_answers(y) * y).sum())(x)  # the answers, as gradients


def _vmap(x):
    return torch.func.vmap(_answers)(x)


def _grad_of_grad(x):
    inner = torch.func.grad(lambda z: (_answers(z) * z * z / 2).sum())  # answers * z
    return torch.func.grad(lambda y: inner(y).sum())(x)


def test_answers_inside_transforms_eagerly_and_under_compile_without_graph_breaks():
    x = torch.ones(3)
    # depth, needs_math_sdpa, is_traced
    assert _answers(x).tolist() == [0, 0, 0]
    assert _grad(x).tolist() == [1, 0, 1]  # one grad: fused SDPA is fine
    assert _vmap(x[None]).tolist() == [[1, 1, 1]]  # vmap: no batching rule for the fused kernel
    assert _grad_of_grad(x).tolist() == [2, 1, 1]
    for fn, arg in ((_answers, x), (_grad, x), (_vmap, x[None])):
        compiled = torch.compile(fn, fullgraph=True, backend="eager")(arg)
        expected = fn(arg)
        expected[..., 2] = 1  # under compile every tensor counts as traced
        assert compiled.tolist() == expected.tolist(), fn.__name__


def test_import_gptfn_survives_torch_moving_its_private_functions():
    code = """
        import sys, torch
        sys.modules["torch._functorch.pyfunctorch"] = None  # as if a torch release moved it
        import gptfn
        x = torch.ones(2)
        print(gptfn.tracing.transform_depth(), gptfn.tracing.needs_math_sdpa(),
              gptfn.tracing.is_traced(x), float(gptfn.forward(gptfn.init(gptfn.GPTConfig(
                  n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=5)),
                  torch.zeros(1, 4, dtype=torch.long)).sum().isfinite()))
        """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["0", "False", "False", "1.0"]


def test_plain_eager_is_eager_code_with_nothing_to_differentiate():
    from gptfn.tracing import plain_eager

    x, w = torch.ones(3), torch.ones(3, requires_grad=True)
    assert plain_eager(x, None) and not plain_eager(x, w)
    with torch.no_grad():
        assert plain_eager(x, w)
    seen = []
    torch.func.vmap(lambda t: seen.append(plain_eager(t)) or t)(torch.ones(2, 3))
    torch.func.grad(lambda t: seen.append(plain_eager(x)) or t.sum())(torch.ones(3))
    assert seen == [False, False]  # inside torch.func transforms
    compiled = torch.compile(lambda t: t + 1 if plain_eager(t) else t - 1, fullgraph=True)
    assert compiled(torch.ones(1)).item() == 0.0  # traced by torch.compile
