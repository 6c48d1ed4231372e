"""Causal self-attention: projections, QK-norm, rotary, the key/value cache, softmax attention.

``self_attention`` is the attention step of the one block. With a cache (in its context) it calls
:func:`update_cache`, which writes this step's keys and values into the cache's preallocated
buffers [batch, max_len, n_kv_head, d_head] at the slots it is given (a tensor, so a compiled
decode step has one static shape) and returns the buffers to attend over; without a cache the
step is plain causal self-attention over the sequence.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from einops import repeat
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptfn.model import decode_kernels
from gptfn.model.context import AttentionImpl, Context
from gptfn.model.layers import apply_rotary, dense, norm
from gptfn.shapes import Float, Params, Tensor
from gptfn.tracing import is_traced, needs_math_sdpa, plain_eager, transform_depth


def attention_qkv(
    p: Params, x: Float[Tensor, "batch seq d_model"]
) -> tuple[Tensor, Tensor, Tensor]:
    """Queries [batch seq head d_head], keys and values [batch seq kv_head d_head].

    Training under autocast, the three projections are one matmul over the weights
    concatenated at call time, as nanoGPT's ``c_attn`` (the tree keeps its per-head leaves):
    the input is cast to half precision once, not three times, and its gradient is one
    matmul, not three cast back and summed. On this CPU's 4 x 128 bfloat16 recipe (T 128,
    batch 32) forward and backward took 5 % less; in float32 it measured no gain. The
    weights' gradients are then slices of one buffer: rows in their leaves' layout for weights
    stored [out, in] (as loaded from Hugging Face), else columns (``gptfn.train`` makes those
    contiguous). Otherwise (float32, inference, decoding) each projection runs alone:
    concatenating would copy the weights for every token."""
    ws = [p[f"w_{n}"] for n in "qkv"]
    biases = [p.get(f"b_{n}") for n in "qkv"]
    fuse = (
        torch.is_autocast_enabled(x.device.type)
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (x, *ws))
        and len({b is None for b in biases}) == 1  # all three biases or none
    )
    if not fuse:
        return tuple(dense(x, w, b) for w, b in zip(ws, biases))  # type: ignore[return-value]
    d = x.shape[-1]
    flat = [w.reshape(d, -1) for w in ws]
    if all(w.T.is_contiguous() for w in flat):  # stored [out, in], as loaded: join the rows
        w = torch.cat([w.T for w in flat]).T  # so each gradient comes in its leaf's layout
    else:
        w = torch.cat(flat, 1)
    b = None if biases[0] is None else torch.cat([b.reshape(-1) for b in biases])  # type: ignore[union-attr]
    parts = dense(x, w, b).split([w.shape[1] * w.shape[2] for w in ws], -1)
    return tuple(y.unflatten(-1, w.shape[1:]) for y, w in zip(parts, ws))  # type: ignore[return-value]


def _qkv_per_head_inputs(p: Params, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys, values from a copy of the normed input per head (``q_input`` ...
    [batch seq head d_model]), so each head's input can be patched on its own. Same
    projections as :func:`attention_qkv`; only run when such a name is asked for."""
    out = []
    for n in "qkv":
        heads = p[f"w_{n}"].shape[1]
        per_head = ctx.tap(f"{n}_input", repeat(x, "b s d -> b s h d", h=heads))
        y = torch.einsum("bshd,dhk->bshk", per_head, p[f"w_{n}"])
        out.append(y if f"b_{n}" not in p else y + p[f"b_{n}"])
    return out[0], out[1], out[2]


def update_cache(
    cache: dict[str, Tensor], k: Tensor, v: Tensor, slots: Tensor, width: int | None = None
) -> tuple[Tensor, Tensor]:
    """Write ``k``, ``v`` [batch n kv_head d_head] into the cache buffers at ``slots`` [n]
    (in place, like a donated buffer) and return the buffers' first ``width`` slots (default:
    all of them) to attend over."""
    cache["k"].index_copy_(1, slots, k.to(cache["k"].dtype))
    cache["v"].index_copy_(1, slots, v.to(cache["v"].dtype))
    if width is None or width == cache["k"].shape[1]:
        return cache["k"], cache["v"]
    return cache["k"][:, :width], cache["v"][:, :width]


def self_attention(
    p: Params, x: Float[Tensor, "batch seq d_model"], ctx: Context
) -> Float[Tensor, "batch seq d_model"]:
    """The attention branch of a block on its normed input ``x``: project, (QK-norm),
    (rotate), (cache), attend, project out. Names are ``{ctx.prefix}*`` (``blocks.{i}.attn.``).
    With a cache in ``ctx`` the new keys and values are written at ``ctx.slots`` first."""
    if any(ctx.wants(f"{n}_input") for n in "qkv"):
        q, k, v = _qkv_per_head_inputs(p, x, ctx)
    else:
        q, k, v = attention_qkv(p, x)
    q, k, v = ctx.tap("q", q), ctx.tap("k", k), ctx.tap("v", v)
    if ctx.cfg.qk_norm:
        q, k = _qk_norm(p, q, ctx, "q"), _qk_norm(p, k, ctx, "k")
    if ctx.rope is not None:
        q, k = (
            ctx.tap("rot_q", apply_rotary(q, *ctx.rope)),
            ctx.tap("rot_k", apply_rotary(k, *ctx.rope)),
        )
    if ctx.cache is not None:  # attend over as many slots as the mask covers
        width = None if ctx.mask is None else ctx.mask.shape[-1]
        k, v = update_cache(ctx.cache, k, v, ctx.slots, width)  # type: ignore[arg-type]
    cfg = ctx.cfg
    z = attend(
        q, k, v, impl=ctx.attention, mask=ctx.mask, ctx=ctx, scale=cfg.attn_scale,
        softcap=cfg.attn_softcap,
    )  # fmt: skip
    z = ctx.tap("z", z)
    if ctx.wants("result"):
        result = ctx.tap("result", torch.einsum("bshk,hkd->bshd", z, p["w_o"]))
        out = result.sum(-2) if "b_o" not in p else result.sum(-2) + p["b_o"]
    else:
        out = attention_out(p, z)
    return ctx.tap("out", out)


def _qk_norm(p: Params, x: Tensor, ctx: Context, n: str) -> Tensor:
    """QK-norm of queries or keys ``x`` [b s h k] (``n``: "q" or "k"): over each head, or over
    the whole projection (``qk_norm_span="projection"``, OLMo-2) before it splits into heads."""
    name = f"{n}_norm"
    if ctx.cfg.qk_norm_span == "head":
        return norm(p[name], x, ctx.scoped(name + "."))
    return norm(p[name], x.flatten(-2), ctx.scoped(name + ".")).unflatten(-1, x.shape[-2:])


def attend(
    q: Float[Tensor, "batch q_seq head d_head"],
    k: Float[Tensor, "batch k_seq kv_head d_head"],
    v: Float[Tensor, "batch k_seq kv_head d_head"],
    *,
    impl: AttentionImpl = "fast",
    mask: Tensor | None = None,
    ctx: Context | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> Float[Tensor, "batch q_seq head d_head"]:
    """Softmax attention scaled by ``scale`` (default 1/sqrt(d_head)), per head: ``z`` before
    the output projection. With ``softcap`` the scores are ``cap * tanh(scores / cap)`` before
    the mask (Gemma 2), on the reference path (the fused kernel has no soft-cap).

    Keys and values may have fewer heads than queries (grouped-query attention): query head i
    reads key/value head i // (head / kv_head), as in Hugging Face's ``repeat_kv``.
    With ``mask=None`` it is causal, query i seeing keys 0..i (queries and keys of one length).
    Otherwise ``mask`` is boolean, broadcastable to [batch head q_seq k_seq], True = may attend.
    ``impl="sdpa"`` calls ``F.scaled_dot_product_attention``. ``impl="fast"`` does too, but
    where a path of gptfn's own is faster: one query with a mask (a decode step, compiled or
    large in half precision, ``_one_query_path``); on CPU in bfloat16, causal attention under
    gradients (autocast training: ``_composed_path``, bfloat16 scores, as autocast's matmuls
    and Hugging Face's eager attention give them) and attention without gradients
    (prefill, evaluation: ``_blocked_path``, float32 scores). ``"reference"`` spells the same
    function out with an explicit mask. Under nested torch.func transforms (grad of grad, jvp,
    vmap) SDPA runs its math backend (``gptfn.tracing.needs_math_sdpa``). The hook of ``ctx``
    sees ``{prefix}scores`` and ``{prefix}pattern`` on the reference path; a hook that wants
    either selects the reference path.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b h s k]
    wants_pattern = ctx is not None and (ctx.wants("scores") or ctx.wants("pattern"))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if impl not in ("fast", "sdpa", "reference"):
        raise ValueError(f"attention impl must be 'fast', 'sdpa' or 'reference', got {impl!r}")
    if impl == "reference" or wants_pattern or softcap is not None:
        z = _reference_attention(q, k, v, mask, ctx, scale, softcap)
    elif impl == "fast" and q.shape[-2] == 1 and mask is not None and _one_query_path(q, k, mask):
        z = _one_query_attention(q, k, v, mask, scale)
    elif impl == "fast" and _composed_path(q, k, v, mask):
        z = _composed_attention(q, k, v, scale)
    elif impl == "fast" and _blocked_path(q, k, v, mask):
        blocked = blocked_attention if torch.compiler.is_compiling() else _blocked_attention
        z = blocked(q, k, v, mask, scale)
    else:
        z = _sdpa(q, k, v, mask, scale)
    return z.transpose(1, 2)  # [b s h k]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    kwargs: dict[str, Any] = {"is_causal": True} if mask is None else {"attn_mask": mask}
    kwargs["scale"] = scale
    if k.shape[1] != q.shape[1]:
        kwargs["enable_gqa"] = True
    if needs_math_sdpa():
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _one_query_path(q: Tensor, k: Tensor, mask: Tensor) -> bool:
    """Whether a one-query step (decoding) takes :func:`_one_query_attention` rather than
    SDPA: always under compile (inside a compiled decode step the explicit form was faster:
    4x128 model, 256 slots, 1.19 vs 1.31 ms per step at batch 1); eager, for half precision
    with heads x keys >= 2048, where SDPA's CPU kernel is slow for one query. Measured eager on
    this 2-core CPU (torch 2.13, bfloat16, 2 threads): 32 heads over 8 kv heads, 1,024 keys:
    1,747 us SDPA, 400 us explicit; 4 heads x 256 keys: 31 vs 69 us, so small stays SDPA."""
    if mask.ndim != 4:
        return False
    if torch.compiler.is_compiling():
        return True
    half = q.dtype in (torch.bfloat16, torch.float16)
    return half and q.shape[1] * k.shape[-2] >= 2048


def _one_query_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None
) -> Tensor:
    """Attention of one query per row (a decode step) as scores, softmax, weighted sum.
    Grouped-query heads share their key/value head without copying the cache; the softmax runs
    in float32 (as SDPA's math backend does for half precision). bfloat16 steps call
    :func:`gptfn.model.decode_kernels.attend_one_bf16` where it is built, compiled or eager
    without gradients (3.7x inductor's loops at 32 heads over 8, 1,024 slots); else, compiled,
    the products are summed in float32, which inductor fuses into one pass over the cache (a
    matmul would first copy the cache's [keys, head] layout to [head, keys]); eager, two
    matmuls."""
    batch, heads, _, d_head = q.shape
    groups = k.shape[1]
    scale = 1 / math.sqrt(d_head) if scale is None else scale
    kernel_ok = torch.compiler.is_compiling() or plain_eager(q, k, v)
    if kernel_ok and decode_kernels.attention_fits(q, k, v, mask):
        z = decode_kernels.attend_one_bf16(
            q.reshape(batch, heads, d_head), k.transpose(1, 2), v.transpose(1, 2),
            mask.reshape(mask.shape[0], -1).expand(batch, -1).contiguous(), scale,
        )  # fmt: skip
        return z.to(v.dtype).reshape(batch, heads, 1, d_head)
    q = q.reshape(batch, groups, heads // groups, d_head)  # query heads of one kv head together
    if mask.shape[1] != 1:  # a per-head mask [b heads 1 keys] follows the grouping
        mask = mask.reshape(mask.shape[0], groups, heads // groups, -1)
    if torch.compiler.is_compiling():
        scores = (q[:, :, :, None].float() * k[:, :, None].float()).sum(-1) * scale
        pattern = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # [b g h/g keys]
        z = (pattern[..., None] * v[:, :, None].float()).sum(-2).to(v.dtype)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        pattern = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        z = torch.matmul(pattern.to(v.dtype), v)
    return z.reshape(batch, heads, 1, d_head)


_COMPOSED_SCORE_BYTES = 32 << 20
"""Largest bfloat16 score tensor (batch x head x seq x seq) of :func:`_composed_attention`."""


def _composed_path(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether causal bfloat16 attention under gradients (autocast training) is composed of
    batched matmuls and a softmax rather than SDPA: on CPU, eager, while its scores fit
    ``_COMPOSED_SCORE_BYTES`` (the probabilities are kept for the backward). SDPA's CPU kernels
    take bfloat16 through float32 blocks; forward and backward, measured on this 2-core CPU
    (torch 2.13, 2 threads, ``experiments/bench_attention.py``): batch 12 x 4 heads x 64 tokens
    3.0 vs 0.66 ms, 32 x 4 x 128 18.9 vs 3.7, 8 x 6 x 256 18.2 vs 6.5, 1 x 32 x 512 40 vs 19.
    The scores are rounded to bfloat16, as every autocast matmul's output is (and as Hugging
    Face's eager attention has them): against float64 the error is up to 2x SDPA's for scores
    of order 1 (tests/test_model.py), 3-5x for scores of order 1-5; ``attention="sdpa"``
    keeps SDPA's float32 scores."""
    if mask is not None or q.dtype != torch.bfloat16 or q.device.type != "cpu":
        return False
    batch, heads, n, _ = q.shape
    if k.shape[-2] != n or batch * heads * n * n * 2 > _COMPOSED_SCORE_BYTES:
        return False
    if needs_math_sdpa() or torch.compiler.is_compiling():
        return False
    return _as_if_training(q, k, v)


_RECOMPUTED = [0]  # depth of ``recomputed`` blocks (a global torch.compile can read)


@contextlib.contextmanager
def recomputed() -> Iterator[None]:
    """Attention takes the path it takes under gradients even without them: remat's forward
    (no gradients) computes what its backward's recomputation (with gradients) computes."""
    _RECOMPUTED[0] += 1
    try:
        yield
    finally:
        _RECOMPUTED[0] -= 1


def _as_if_training(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Gradients are recorded through q, k or v, or this is remat's forward (``recomputed``)."""
    return _RECOMPUTED[0] > 0 or (
        torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    )


def _composed_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal attention of q [b h n d] over k, v [b g n d] as ``baddbmm`` (the causal mask an
    additive bias), softmax and ``bmm``; the query heads of one key/value head are rows of one
    matmul, ordered (head in group, position)."""
    b, heads, n, d = q.shape
    groups = k.shape[1]
    hidden = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    bias = torch.zeros(n, n, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
    bias = bias.repeat(heads // groups, 1).expand(b * groups, -1, -1)
    keys = k.reshape(b * groups, n, d).transpose(1, 2)
    scores = torch.baddbmm(bias, q.reshape(b * groups, -1, d), keys, alpha=scale)
    return torch.bmm(scores.softmax(-1), v.reshape(b * groups, n, d)).view(b, heads, n, d)


_BLOCKED_MIN_QUERIES = 128
"""Fewest queries for which :func:`_blocked_attention` replaces SDPA (see ``_blocked_path``)."""

_BLOCKED_SCORE_BYTES = 4 << 20
"""Bytes of float32 scores per block of query rows: small enough to be reused from the
allocator's free lists (fresh pages cost as much as the softmax here) and to stay in cache."""


def _blocked_path(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether :func:`_blocked_attention` runs instead of SDPA: bfloat16 on CPU without
    gradients or transforms (a prefill, an evaluation), at least ``_BLOCKED_MIN_QUERIES``
    queries, causal (``mask=None``) or a boolean mask [batch|1, head|1, q_seq, k_seq].
    Measured on this 2-core CPU (torch 2.13, 2 threads), 32 heads over 8, d_head 64, causal:
    13.6 ms SDPA vs 7.6 ms blocked at 512 queries, 37 vs 25 ms at 1,024, 1.10 vs 0.97 ms at
    128, but 0.33 vs 0.37 at 64 (``experiments/bench_attention.py``); its error against
    float64 is 1.3x SDPA's (tests/test_model.py checks <= 1.5x)."""
    if q.dtype != torch.bfloat16 or q.device.type != "cpu" or q.shape[-2] < _BLOCKED_MIN_QUERIES:
        return False
    if mask is None and q.shape[-2] != k.shape[-2]:
        return False
    if mask is not None and (
        mask.dtype != torch.bool
        or mask.ndim != 4
        or mask.shape[-2:] != (q.shape[-2], k.shape[-2])
        or mask.shape[1] not in (1, q.shape[1])
    ):
        return False
    if transform_depth() or (is_traced(q) and not torch.compiler.is_compiling()):
        return False  # under compile it runs as one opaque op, blocked_attention
    return not _as_if_training(q, k, v)


def _key_bounds(mask: Tensor | None, n: int) -> tuple[list[int], list[int]]:
    """For each query row: one past the last key any batch row or head may see, and the first
    key some may not see (keys before it need no masking)."""
    if mask is None:  # causal, queries and keys of one length
        return list(range(1, n + 1)), list(range(1, n + 1))
    seen, hidden = mask.any(0).any(0), (~mask).any(0).any(0)  # [q_seq, k_seq]
    keys = torch.arange(seen.shape[-1], device=mask.device)
    reach = torch.where(seen, keys + 1, 0).amax(-1).tolist()
    return reach, torch.where(hidden, keys, seen.shape[-1]).amin(-1).tolist()


def _blocked_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> Tensor:
    """Attention of q [b h n d] over k, v [b g m d] (bfloat16) as float32 scores, softmax and
    a bfloat16 weighted sum, a block of query rows at a time: each block stops at the last key
    any of its rows may see (a causal prefill does about half the work) and its scores fit
    ``_BLOCKED_SCORE_BYTES``. The query heads of one key/value head are matmul rows together,
    so grouped-query attention never repeats keys. A row that sees no key falls back to SDPA."""
    if mask is not None and not bool(mask.any(-1).all()):
        return _sdpa(q, k, v, mask, scale)
    with torch.autocast(q.device.type, enabled=False):  # keep the scores float32
        return _attend_in_blocks(q, k, v, mask, scale)


def _attend_in_blocks(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    b, heads, n, d = q.shape
    groups, m = k.shape[1], k.shape[2]
    per = heads // groups
    reach, first = _key_bounds(mask, n)
    rows = max(16, min(n, _BLOCKED_SCORE_BYTES // (4 * b * heads * m)))
    # rows ordered (position, head within group): a block of positions is a slice of rows
    qg = q.reshape(b, groups, per, n, d).transpose(2, 3)
    qg = qg.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale)
    qg, kt, vc = qg.reshape(b, groups, n * per, d), k.float().transpose(-1, -2), v.contiguous()
    z = q.new_empty(b, n, groups, per, d)
    for t0 in range(0, n, rows):
        t1 = min(n, t0 + rows)
        e, lo = max(reach[t0:t1]), min(first[t0:t1])
        scores = torch.matmul(qg[:, :, t0 * per : t1 * per], kt[..., :e])
        scores = scores.view(b, groups, t1 - t0, per, e)
        if lo < e:
            hide = ~_block_mask(mask, slice(t0, t1), slice(lo, e), groups)
            scores[..., lo:].masked_fill_(hide, float("-inf"))
        pattern = torch.softmax(scores, -1).to(v.dtype).view(b, groups, (t1 - t0) * per, e)
        out = torch.matmul(pattern, vc[:, :, :e]).view(b, groups, t1 - t0, per, d)
        z[:, t0:t1] = out.transpose(1, 2)
    return z.view(b, n, heads, d).transpose(1, 2)


@torch.library.custom_op("gptfn::blocked_attention", mutates_args=())
def blocked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """:func:`_blocked_attention` as one op, so a compiled prefill calls it too (its blocks'
    bounds are read from the mask's values, which a graph cannot do); no gradient."""
    return _blocked_attention(q, k, v, mask, scale)


@blocked_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    b, heads, n, d = q.shape
    return q.new_empty(b, n, heads, d).transpose(1, 2)  # the layout _blocked_attention returns


def _block_mask(mask: Tensor | None, rows: slice, keys: slice, groups: int) -> Tensor:
    """The mask of query ``rows`` over ``keys`` (both slices with ints), shaped to broadcast
    against scores [b, groups, rows, head per group, keys]."""
    if mask is None:  # causal
        queries = torch.arange(rows.start, rows.stop)[:, None, None]
        return torch.arange(keys.start, keys.stop) <= queries  # [rows, 1, keys]
    blk = mask[:, :, rows, keys]
    if blk.shape[1] == 1:
        return blk[:, :, :, None]  # [b|1, 1, rows, 1, keys]
    return blk.unflatten(1, (groups, -1)).transpose(2, 3)  # [b, groups, rows, per, keys]


def _reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    ctx: Context | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> Tensor:
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhqk,bhsk->bhqs", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    if ctx is not None:
        scores = ctx.tap("scores", scores)
    pattern = scores.softmax(dim=-1)
    pattern = pattern if ctx is None else ctx.tap("pattern", pattern)
    return torch.einsum("bhqs,bhsk->bhqk", pattern, v)


def attention_out(
    p: Params, z: Float[Tensor, "batch seq head d_head"]
) -> Float[Tensor, "batch seq d_model"]:
    """Output projection: sum over heads of z_h @ w_o[h] (+ b_o)."""
    return dense(z, p["w_o"], p.get("b_o"), in_dims=2)  # [b s h k] x [h k d]
