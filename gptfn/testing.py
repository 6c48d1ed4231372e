"""Property checks and hypothesis strategies for your own model variants.

Write a new attention, a pruning rule or an optimizer, then check in a few lines that it is still
causal, batch-independent, pure, and differentiated the same way by ``torch.func``, autograd and
finite differences::

    from hypothesis import given
    from gptfn.testing import models, tokens, assert_causal

    @given(models(), st.data())
    def test_my_forward_is_causal(model, data):
        cfg, params = model
        assert_causal(my_forward, params, data.draw(tokens(cfg)))

Every check raises ``AssertionError`` with a message that names the violation. The strategies
draw architectures as well as sizes (rotary or learned positions, RMSNorm, gated MLPs,
grouped-query attention, parallel residual ...) and shrink towards the smallest GPT-2 config and
the shortest sequence, so failures are reported small.
This module imports hypothesis; ``import gptfn`` alone does not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch
from hypothesis import strategies as st
from torch import Tensor

from gptfn.model import GPTConfig, init
from gptfn.model.config import MLPS, NORM_POSITIONS, NORMS, POSITIONS, QK_NORM_SPANS
from gptfn.tree import Tree, flatten, unstack

# ----------------------------------------------------------------------------- strategies


@st.composite
def configs(
    draw: st.DrawFn,
    vocab_size: tuple[int, int] = (2, 32),
    block_size: tuple[int, int] = (1, 16),
    n_layer: tuple[int, int] = (1, 2),
    n_head: tuple[int, int] = (1, 4),
    head_size: tuple[int, int] = (1, 8),
    bias: bool | None = None,
    tie_embeddings: bool | None = None,
    *,
    architectures: bool = True,
    **fixed: Any,
) -> GPTConfig:
    """Valid ``GPTConfig``s; each bound is an inclusive ``(min, max)``. ``n_embd`` is
    ``n_head * head_size``, so it always divides. ``bias``/``tie_embeddings`` None means drawn.

    With ``architectures`` (the default) every option is drawn too: positions, norm, MLP kind and
    width, key/value heads (a divisor of ``n_head``), QK-norm, the separate biases, parallel
    residual, logit soft-cap, sliding window, norm placement, attention scale and soft-cap;
    rotary positions round ``head_size`` up to an
    even number.
    ``architectures=False`` draws GPT-2 only. Keywords naming other ``GPTConfig`` fields fix
    them (``configs(position="rotary")``). Everything shrinks towards GPT-2's choices."""
    heads = draw(st.integers(*n_head))
    sizes = {  # drawn in the order gptfn always drew them: examples stay the same
        "vocab_size": draw(st.integers(*vocab_size)),
        "block_size": draw(st.integers(*block_size)),
        "n_layer": draw(st.integers(*n_layer)),
        "n_head": heads,
    }
    size = draw(st.integers(*head_size))
    options: dict[str, Any] = {
        "bias": draw(st.booleans()) if bias is None else bias,
        "tie_embeddings": draw(st.booleans()) if tie_embeddings is None else tie_embeddings,
    }
    if architectures:
        size = _draw_architecture(draw, options, heads, size)
    return GPTConfig(**sizes, n_embd=heads * size, **(options | fixed))


def _draw_architecture(draw: st.DrawFn, options: dict[str, Any], heads: int, size: int) -> int:
    """Draw every architecture option into ``options`` (in the order gptfn always drew them,
    newer options last); returns the head size (rotary rounds it up to an even number)."""
    options["position"] = draw(st.sampled_from(POSITIONS))
    if options["position"] == "rotary":
        size += size % 2  # rotary turns pairs of dims
        fractions = [1.0, 0.5] if size % 4 == 0 else [1.0]
        options["rotary_fraction"] = draw(st.sampled_from(fractions))
    options["norm"] = draw(st.sampled_from(NORMS))
    options["mlp"] = draw(st.sampled_from(MLPS))
    options["d_mlp"] = draw(st.one_of(st.none(), st.integers(1, 12)))
    divisors = [d for d in range(heads, 0, -1) if heads % d == 0]
    options["n_kv_head"] = draw(st.sampled_from(divisors))
    for name in ("qkv_bias", "mlp_bias", "norm_bias"):
        options[name] = draw(st.one_of(st.none(), st.booleans()))
    options["qk_norm"] = draw(st.booleans())
    options["parallel_residual"] = draw(st.booleans())
    options["logit_softcap"] = draw(st.one_of(st.none(), st.floats(1.0, 30.0)))
    options["norm_eps"] = draw(st.sampled_from([1e-5, 1e-6]))
    if options["position"] == "rotary":
        options["rope_theta"] = draw(st.sampled_from([10000.0, 500.0]))
        half = int(size * options["rotary_fraction"]) // 2
        longrope = ("longrope", 4, 1.2, *[1.0 + i for i in range(half)], *[3.0] * half)
        scalings = [None, (8.0, 1.0, 4.0, 8), ("linear", 2.0), longrope]
        options["rope_scaling"] = draw(st.sampled_from(scalings))
    options["sliding_window"] = draw(st.one_of(st.none(), st.integers(1, 8)))
    if options["sliding_window"] is not None:
        options["window_pattern"] = draw(st.sampled_from([None, "LG", "GLL"]))
    # post-norms of a few numbers (or of a narrow MLP's low-rank output, or LayerNorm's centred
    # values) are near steps whose slope finite differences miss: drawn where they are smooth
    if heads * size >= 8 and options["d_mlp"] is None and options["norm"] != "layernorm":
        options["norm_position"] = draw(st.sampled_from(NORM_POSITIONS))
    if options["qk_norm"]:
        options["qk_norm_span"] = draw(st.sampled_from(QK_NORM_SPANS))
    options["embed_scale"] = draw(st.booleans())
    options["attn_scale"] = draw(st.one_of(st.none(), st.floats(0.1, 1.0)))
    options["attn_softcap"] = draw(st.one_of(st.none(), st.floats(1.0, 50.0)))
    if options["position"] == "rotary":
        options["rope_layers"] = draw(st.sampled_from([None, "RN", "NRR"]))
        if options["sliding_window"] is not None:
            options["rope_local_theta"] = draw(st.sampled_from([None, 100.0]))
    return size


DRAWN = frozenset({
    "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "tie_embeddings",
    "position", "rotary_fraction", "norm", "mlp", "d_mlp", "n_kv_head", "qkv_bias", "mlp_bias",
    "norm_bias", "qk_norm", "parallel_residual", "logit_softcap", "norm_eps", "rope_theta",
    "rope_scaling", "sliding_window", "window_pattern", "norm_position", "qk_norm_span",
    "embed_scale", "attn_scale", "attn_softcap", "rope_layers", "rope_local_theta",
})  # fmt: skip
"""The ``GPTConfig`` fields :func:`configs` draws (with ``architectures``)."""

EXEMPT = {
    "d_head": "n_embd = n_head * head_size, so d_head is drawn through head_size",
}
"""Fields :func:`configs` does not draw, each with the reason; a test holds ``DRAWN | EXEMPT``
to every ``GPTConfig`` field, so a new option is drawn or named here."""


@st.composite
def models(
    draw: st.DrawFn,
    configs: st.SearchStrategy[GPTConfig] | None = None,
    dtype: torch.dtype = torch.float32,
    init_scale: float = 10.0,
) -> tuple[GPTConfig, Tree]:
    """``(cfg, params)`` with a drawn seed. Matrices are scaled by ``init_scale`` (default 10)
    so that a leak between positions or rows shows far above floating-point noise."""
    cfg = draw(configs if configs is not None else globals()["configs"]())
    params = init(cfg, seed=draw(st.integers(0, 2**16)), dtype=dtype)
    params = optree.tree_map(lambda x: x * init_scale if x.ndim > 1 else x, params)
    return cfg, params


@st.composite
def tokens(
    draw: st.DrawFn,
    cfg: GPTConfig,
    batch: tuple[int, int] = (1, 3),
    length: tuple[int, int] | None = None,
) -> Tensor:
    """Integer token batches ``[batch, length]`` valid for ``cfg`` (length up to block_size)."""
    n_rows = draw(st.integers(*batch))
    lo, hi = length if length is not None else (1, cfg.block_size)
    n_cols = draw(st.integers(lo, min(hi, cfg.block_size)))
    ids = st.integers(0, cfg.vocab_size - 1)
    rows = draw(
        st.lists(st.lists(ids, min_size=n_cols, max_size=n_cols), min_size=n_rows, max_size=n_rows)
    )
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------- checks


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _vocab(params: Tree, tokens: Tensor) -> int:
    wte = params.get("wte") if isinstance(params, dict) else None
    return int(wte.shape[0]) if wte is not None else int(tokens.max()) + 2


def assert_causal(
    fn: Callable[[Tree, Tensor], Tensor],
    params: Tree,
    tokens: Tensor,
    positions: list[int] | None = None,
    atol: float = 1e-6,
) -> None:
    """``fn(params, tokens) -> [batch, seq, ...]``: changing tokens at positions >= t never changes
    outputs at positions < t, for every t (or those in ``positions``)."""
    vocab = _vocab(params, tokens)
    if vocab < 2:
        return
    base = fn(params, tokens)
    for t in positions if positions is not None else range(1, tokens.shape[1]):
        changed = tokens.clone()
        changed[:, t:] = (changed[:, t:] + 1) % vocab
        out = fn(params, changed)
        diff = (out[:, :t].double() - base[:, :t].double()).abs()
        if diff.numel() and float(diff.max()) > atol:
            flat = int(diff.reshape(diff.shape[0], t, -1).amax(-1).argmax())
            row, pos = divmod(flat, t)
            raise AssertionError(
                f"assert_causal: output at position {pos} (row {row}) changed by "
                f"{float(diff.max()):.3g} when tokens at positions >= {t} changed: it sees the "
                f"future (sequence length {tokens.shape[1]})"
            )


def assert_batch_independent(
    fn: Callable[[Tree, Tensor], Tensor], params: Tree, tokens: Tensor, atol: float = 1e-6
) -> None:
    """Changing one row of ``tokens`` never changes another row's output."""
    vocab = _vocab(params, tokens)
    if tokens.shape[0] < 2 or vocab < 2:
        return
    base = fn(params, tokens)
    for row in range(tokens.shape[0]):
        changed = tokens.clone()
        changed[row] = (changed[row] + 1) % vocab
        out = fn(params, changed)
        for other in range(tokens.shape[0]):
            if other != row and _max_diff(out[other], base[other]) > atol:
                raise AssertionError(
                    f"assert_batch_independent: changing row {row} changed row {other} by "
                    f"{_max_diff(out[other], base[other]):.3g} (batch of {tokens.shape[0]})"
                )


def assert_no_mutation(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)``; fail if any tensor in the arguments changed (value or an
    in-place write). Returns ``fn``'s result."""
    named = flatten({"args": list(args), "kwargs": kwargs}) if args or kwargs else {}
    named = {k: v for k, v in named.items() if isinstance(v, Tensor)}
    before = {k: (v.detach().clone(), v._version) for k, v in named.items()}
    result = fn(*args, **kwargs)
    for name, tensor in named.items():
        value, version = before[name]
        if tensor._version != version or not torch.equal(tensor.detach(), value):
            raise AssertionError(
                f"assert_no_mutation: {name} was modified in place (max change "
                f"{_max_diff(tensor.detach(), value):.3g}, version {version} -> {tensor._version})"
            )
    return result


def _autograd_grads(loss_fn: Callable[..., Tensor], params: Tree, *batch: Any) -> Tree:
    leaves, spec = optree.tree_flatten(params)
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    value = loss_fn(optree.tree_unflatten(spec, leaves), *batch)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return optree.tree_unflatten(
        spec, [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    )


def assert_grads_match(
    loss_fn: Callable[..., Tensor],
    params: Tree,
    *batch: Any,
    directions: int = 3,
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    eps: float = 1e-7,
) -> None:
    """``torch.func.grad`` agrees with autograd, and (in float64) with central finite
    differences along ``directions`` random directions and along each leaf. The step ``eps``
    is 1e-7: post-norms on a branch's small output are steep, and at 1e-6 the differences'
    own error (eps^2 times the third derivative) reached 1e-4; rounding at 1e-7 stays ~1e-9."""
    func_grads = flatten(torch.func.grad(loss_fn)(params, *batch))
    auto_grads = flatten(_autograd_grads(loss_fn, params, *batch))
    for name, g in func_grads.items():
        d = _max_diff(g, auto_grads[name])
        if d > atol + rtol * float(auto_grads[name].abs().max()):
            raise AssertionError(
                f"assert_grads_match: torch.func.grad and autograd differ at {name} by {d:.3g}"
            )
    p64 = optree.tree_map(lambda x: x.double() if x.is_floating_point() else x, params)
    b64 = [x.double() if isinstance(x, Tensor) and x.is_floating_point() else x for x in batch]
    grads64 = flatten(torch.func.grad(loss_fn)(p64, *b64))
    leaves, spec = optree.tree_flatten(p64)
    names = list(flatten(p64))
    gen = torch.Generator().manual_seed(seed)

    def directional(vs: list[Tensor]) -> tuple[float, float]:
        shifted = [
            optree.tree_unflatten(spec, [x + s * eps * v for x, v in zip(leaves, vs)])
            for s in (1, -1)
        ]
        fd = float(loss_fn(shifted[0], *b64) - loss_fn(shifted[1], *b64)) / (2 * eps)
        analytic = sum(float((grads64[n] * v).sum()) for n, v in zip(names, vs))
        return fd, analytic

    probes = [
        ("a random direction", [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in leaves])
        for _ in range(directions)
    ]
    for i, name in enumerate(names):
        vs = [torch.zeros_like(x) for x in leaves]
        vs[i] = torch.randn(leaves[i].shape, generator=gen, dtype=leaves[i].dtype)
        probes.append((f"leaf {name}", vs))
    for label, vs in probes:
        fd, analytic = directional(vs)
        if abs(fd - analytic) > 1e-7 + rtol * max(abs(fd), abs(analytic)):
            raise AssertionError(
                f"assert_grads_match: along {label} the gradient gives {analytic:.6g} but a "
                f"float64 finite difference gives {fd:.6g} (a wrong backward?)"
            )


def _tree_outputs_close(a: Any, b: Any, atol: float, rtol: float, label: str) -> None:
    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    if len(la) != len(lb):
        raise AssertionError(f"{label}: outputs have different structures")
    for i, (x, y) in enumerate(zip(la, lb)):
        if isinstance(x, Tensor):
            d = _max_diff(x, y)
            if x.shape != y.shape or d > atol + rtol * float(y.abs().max() if y.numel() else 0):
                raise AssertionError(
                    f"{label}: output {i} differs by {d:.3g} "
                    f"(shapes {tuple(x.shape)} vs {tuple(y.shape)})"
                )


def assert_vmap_matches_loop(
    fn: Callable[..., Any],
    stacked_params: Tree,
    *args: Any,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> None:
    """``vmap(fn, in_dims=(0, None, ...))`` over a stacked tree equals a loop over its members."""
    in_dims = (0, *([None] * len(args)))
    try:
        batched = torch.func.vmap(fn, in_dims=in_dims)(stacked_params, *args)
    except Exception as err:
        raise AssertionError(
            f"assert_vmap_matches_loop: vmap failed: {type(err).__name__}: {err}"
        ) from err
    looped = [fn(member, *args) for member in unstack(stacked_params)]
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *looped)
    _tree_outputs_close(batched, stacked, atol, rtol, "assert_vmap_matches_loop")


def assert_compile_matches_eager(
    fn: Callable[..., Any],
    *args: Any,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    more_args: Sequence[tuple[Any, ...]] = (),
    fullgraph: bool = True,
    **compile_kwargs: Any,
) -> Callable[..., Any]:
    """``torch.compile(fn, fullgraph=True)`` compiles ``fn`` as one graph and equals it.

    The compiled function is called on ``args``, then on each tuple of ``more_args`` (other
    values of the same shapes: another batch, a later step's state), and must not recompile
    for them; every call must match ``fn`` eagerly. Inputs are copied for each run.

    Args:
      fn: The function to compile.
      *args: Its arguments for the first call (the one that compiles).
      atol, rtol: The tolerance of each output leaf.
      more_args: Further argument tuples the compiled function must serve without recompiling.
      fullgraph: False allows graph breaks (a fallback to eager then passes unnoticed).
      **compile_kwargs: Passed to ``torch.compile`` (``backend=``, ``mode=`` ...); ``dynamic``
        is False unless given (static shapes: a new shape is a new graph, values never are).

    Returns:
      The compiled function, to be called again by the caller.
    """
    compile_kwargs.setdefault("dynamic", False)
    compiled = torch.compile(fn, fullgraph=fullgraph, **compile_kwargs)
    for i, call_args in enumerate([args, *more_args]):
        eager = fn(*copy.deepcopy(call_args))
        stance = "fail_on_recompile" if i else "default"
        try:
            with torch.compiler.set_stance(stance):
                out = compiled(*copy.deepcopy(call_args))
        except Exception as err:
            what = f"recompiled for more_args[{i - 1}]" if i else "torch.compile failed"
            raise AssertionError(
                f"assert_compile_matches_eager: {what}: {type(err).__name__}: {err}"
            ) from err
        _tree_outputs_close(out, eager, atol, rtol, "assert_compile_matches_eager")
    return compiled
