"""``init``, the one ``block``, ``forward`` and ``loss``.

``forward`` (training, evaluation, capture/patching through ``hook``, remat) and
``gptfn.generation`` (with a key/value cache) both build a :class:`Context` and run
:func:`run_blocks`, which calls :func:`block` for every layer.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import optree
import torch
import torch.nn.functional as F

from gptfn.model.attention import self_attention
from gptfn.model.config import GPTConfig
from gptfn.model.context import AttentionImpl, Context, Hook
from gptfn.model.layers import embed, linear, mlp, norm, rotary_tables
from gptfn.model.remat import remat as checkpoint_block
from gptfn.shapes import Float, Int, Params, Tensor, checked, runtime_checks_enabled
from gptfn.tracing import is_traced

# ----------------------------------------------------------------------------- init


def _spec(cfg: GPTConfig) -> dict[str, Any]:
    """The tree's layout: each leaf is ``(shape, how to initialise it)``. Insertion order is the
    order ``init`` draws in (the default config draws exactly as gptfn always did)."""
    d, h, g, k, f = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.d_head, cfg.d_mlp

    def norm_spec(width: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scale": ((width,), "zeros" if cfg.norm == "rmsnorm_plus1" else "ones")
        }
        if cfg.norm_bias:
            out["bias"] = ((width,), "zeros")
        return out

    def block_spec() -> dict[str, Any]:
        attn: dict[str, Any] = {
            "w_q": ((d, h, k), "normal"),
            "w_k": ((d, g, k), "normal"),
            "w_v": ((d, g, k), "normal"),
            "w_o": ((h, k, d), "resid"),
        }
        if cfg.qkv_bias:
            attn |= {"b_q": ((h, k), "zeros"), "b_k": ((g, k), "zeros"), "b_v": ((g, k), "zeros")}
        if cfg.bias:
            attn["b_o"] = ((d,), "zeros")
        if cfg.qk_norm:
            wide = cfg.qk_norm_span == "projection"
            attn |= {
                "q_norm": norm_spec(k * h if wide else k),
                "k_norm": norm_spec(k * g if wide else k),
            }
        mlp_p: dict[str, Any] = {"w_gate": ((d, f), "normal")} if cfg.gated else {}
        mlp_p |= {"w_in": ((d, f), "normal"), "w_out": ((f, d), "resid")}
        if cfg.mlp_bias:
            mlp_p |= {"b_in": ((f,), "zeros"), "b_out": ((d,), "zeros")}
            if cfg.gated:
                mlp_p["b_gate"] = ((f,), "zeros")
        pre, post = cfg.norm_position != "post", cfg.norm_position != "pre"
        return {
            **({"ln_1": norm_spec(d)} if pre else {}), "attn": attn,
            **({"ln_attn_out": norm_spec(d)} if post else {}),
            **({"ln_2": norm_spec(d)} if pre else {}), "mlp": mlp_p,
            **({"ln_mlp_out": norm_spec(d)} if post else {}),
        }  # fmt: skip

    spec: dict[str, Any] = {"wte": ((cfg.vocab_size, d), "normal")}
    if cfg.position == "learned":
        spec["wpe"] = ((cfg.block_size, d), "normal")
    spec["blocks"] = [block_spec() for _ in range(cfg.n_layer)]
    spec["ln_f"] = norm_spec(d)
    if not cfg.tie_embeddings:
        spec["unembed"] = ((cfg.vocab_size, d), "normal")
    return spec


def init(
    cfg: GPTConfig,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    zero_out_proj: bool = False,
) -> Params:
    """Fresh parameters for ``cfg`` (the tree carries ``cfg`` as ``params["config"]``):
    N(0, 0.02) weights, N(0, 0.02/sqrt(2 n_layer)) residual outputs (``w_o``, ``w_out``),
    zero biases, unit norm scales. Deterministic in ``seed``. ``device="meta"`` gives the
    tree's shapes with no storage and no drawing (like ``jax.eval_shape``).
    ``zero_out_proj=True`` starts ``w_o`` and ``w_out`` at zero (modded-nanogpt's init: each
    block starts as the identity); the other leaves are drawn exactly as without it."""
    gen = torch.Generator().manual_seed(seed)
    scales = {"normal": 0.02, "resid": 0.0 if zero_out_proj else 0.02 / math.sqrt(2 * cfg.n_layer)}
    abstract = device is not None and torch.device(device).type == "meta"

    def build(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: build(value) for key, value in node.items()}
        if isinstance(node, list):
            return [build(value) for value in node]
        shape, kind = node
        if abstract:
            return torch.empty(shape, dtype=dtype, device="meta")
        if kind == "ones":
            value = torch.ones(shape)
        elif kind == "zeros":
            value = torch.zeros(shape)
        else:
            value = torch.randn(shape, generator=gen) * scales[kind]
        return value.to(device=device, dtype=dtype)

    return {**build(_spec(cfg)), "config": cfg}


def check_params(params: Params, cfg: GPTConfig | None = None) -> None:
    """Raise ``ValueError`` unless the tree has exactly the leaves and shapes ``cfg`` (default:
    the tree's own config) calls for; the message lists what is missing, extra or misshapen."""
    cfg = GPTConfig.from_params(params) if cfg is None else cfg
    paths, shapes, _ = optree.tree_flatten_with_path(
        _spec(cfg), is_leaf=lambda n: isinstance(n, tuple)
    )
    want = {".".join(map(str, p)): tuple(s[0]) for p, s in zip(paths, shapes)}
    paths, leaves, _ = optree.tree_flatten_with_path(params)
    have = {".".join(map(str, p)): tuple(x.shape) for p, x in zip(paths, leaves)}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = [
        f"{n} {have[n]} (expected {want[n]})"
        for n in sorted(want)
        if have.get(n, want[n]) != want[n]
    ]
    if missing or extra or wrong:
        raise ValueError(
            f"parameters do not fit {cfg}: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )


# ----------------------------------------------------------------------------- the block


def block(
    p: Params, x: Float[Tensor, "batch seq d_model"], ctx: Context
) -> Float[Tensor, "batch seq d_model"]:
    """One residual block: ``x + attn(ln_1 x)``, then ``+ mlp(ln_2 .)``; with
    ``parallel_residual`` both branches read ``x``. ``ctx`` is the block's (``ctx.at(i)``)."""
    x = ctx.tap("resid_pre", x)
    if ctx.cfg.parallel_residual:
        return ctx.tap(
            "resid_post", x + ctx.drop(_attention(p, x, ctx)) + ctx.drop(_mlp(p, x, ctx))
        )
    h = ctx.tap("resid_mid", x + ctx.drop(_attention(p, x, ctx)))
    return ctx.tap("resid_post", h + ctx.drop(_mlp(p, h, ctx)))


def _attention(p: Params, x: Tensor, ctx: Context) -> Tensor:
    """The attention branch: ``attn(ln_1 x)`` (norms as :func:`_branch` places them)."""
    attend = functools.partial(self_attention, p["attn"], ctx=ctx.scoped("attn."))
    return _branch(p, x, ctx, ("ln_1", "ln_attn_out"), attend)


def _mlp(p: Params, x: Tensor, ctx: Context) -> Tensor:
    """The MLP branch: ``mlp(ln_2 x)``; its input is named ``mlp_in``."""
    x = ctx.tap("mlp_in", x)
    return _branch(
        p, x, ctx, ("ln_2", "ln_mlp_out"), functools.partial(mlp, p["mlp"], ctx=ctx.scoped("mlp."))
    )


def _branch(p: Params, x: Tensor, ctx: Context, norms: tuple[str, str], fn: Any) -> Tensor:
    """``fn`` with the config's ``norm_position``: ``pre`` norms its input (``norms[0]``),
    ``post`` its output (``norms[1]``, before the residual add), ``sandwich`` both."""
    pre, post = norms
    where = ctx.cfg.norm_position
    h = fn(x if where == "post" else norm(p[pre], x, ctx.scoped(pre + ".")))
    return h if where == "pre" else norm(p[post], h, ctx.scoped(post + "."))


def unembed(
    params: Params, x: Float[Tensor, "*batch d_model"], ctx: Context | None = None
) -> Float[Tensor, "*batch vocab"]:
    """Final norm, then logits through the (tied unless ``unembed`` exists) embedding, then the
    optional soft-cap."""
    ctx = Context(GPTConfig.from_params(params)) if ctx is None else ctx
    logits = linear(
        norm(params["ln_f"], x, ctx.scoped("ln_f.")), params.get("unembed", params["wte"]), None
    )
    cap = ctx.cfg.logit_softcap
    return logits if cap is None else cap * torch.tanh(logits / cap)


# ----------------------------------------------------------------------------- model


def check_tokens(params: Params, tokens: Tensor, name: str = "tokens", *, allow: int = 0) -> None:
    """Raise unless ``tokens`` fit the model: length <= block_size, ids in [-allow, vocab).

    The length check is free and always runs; the id check reads values, so it is skipped when
    checks are off or ``tokens`` is a torch.func/compile-traced (or meta) tensor.
    """
    cfg = GPTConfig.from_params(params)
    if tokens.shape[-1] > cfg.block_size:
        raise ValueError(
            f"{name} has sequence length {tokens.shape[-1]}, longer than block_size "
            f"{cfg.block_size}"
        )
    if tokens.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor, got dtype {tokens.dtype}")
    if (
        runtime_checks_enabled()
        and tokens.numel()
        and tokens.device.type != "meta"
        and not is_traced(tokens)
    ):
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < -allow or hi >= cfg.vocab_size:
            bad = lo if lo < -allow else hi
            raise ValueError(
                f"{name} contains id {bad}, outside [{-allow}, {cfg.vocab_size}) for this model"
            )


def context(params: Params, positions: Tensor, **fields: Any) -> Context:
    """The :class:`Context` of one pass over ``positions`` (rotary tables and the sliding
    window's mask computed once)."""
    cfg = GPTConfig.from_params(params)
    rope = rotary_tables(cfg, positions) if cfg.position == "rotary" else None
    if cfg.rope_local_theta is not None:
        fields["rope_local"] = rotary_tables(cfg, positions, cfg.rope_local_theta, scaled=False)
    if cfg.sliding_window is not None:
        fields["window_mask"] = window_mask(
            cfg.sliding_window, positions, fields.get("mask"), fields.get("slots")
        )
    return Context(cfg, rope=rope, **fields)


def window_mask(
    window: int, positions: Tensor, mask: Tensor | None, slots: Tensor | None
) -> Tensor:
    """The mask of a sliding-window layer: ``mask`` (None: causal over the positions), and
    key j visible from query i only if ``j > i - window`` (Hugging Face's overlay). Queries are
    at ``slots`` (None: 0..n-1) among the keys, as in a cache; masked, not rolled, so a cached
    generation sees exactly what a full forward does."""
    n, device = positions.shape[-1], positions.device
    query = slots if slots is not None else torch.arange(n, device=device)
    key = torch.arange(n if mask is None else mask.shape[-1], device=device)
    near = key[None, :] > query[:, None] - window
    base = key[None, :] <= query[:, None] if mask is None else mask
    return (base & near).expand(1, 1, -1, -1) if mask is None else base & near


def run_blocks(
    params: Params,
    tokens: Tensor,
    positions: Tensor,
    ctx: Context,
    *,
    remat: bool = False,
    last_only: bool = False,
    stop_at_layer: int | None = None,
) -> Tensor:
    """Embed, run every block, unembed: the body of ``forward`` and of cached generation.
    ``last_only`` unembeds the last position only (a prompt's prefill needs no other logits:
    with a 128k vocabulary they cost more than the blocks); ``stop_at_layer`` returns the
    residual stream entering that block instead (no later block runs, no unembedding)."""
    x = ctx.drop(embed(params, tokens, positions, ctx))
    for i, p in enumerate(params["blocks"][:stop_at_layer]):
        if remat:  # recompute the block's activations in the backward pass
            x = checkpoint_block(functools.partial(block, ctx=ctx.at(i)))(p, x)
        else:
            x = block(p, x, ctx.at(i))
    if stop_at_layer is not None:
        return x
    return unembed(params, x[:, -1:] if last_only else x, ctx)


@checked
def forward(
    params: Params,
    tokens: Int[Tensor, "batch seq"],
    *,
    attention: AttentionImpl = "fast",
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
    remat: bool = False,
    hook: Hook | None = None,
    stop_at_layer: int | None = None,
) -> Float[Tensor, "batch seq vocab"]:
    """Logits for every position of ``tokens``; pure in ``params``.

    Args:
      params: a tree from :func:`init`, ``gptfn.load_pretrained`` or a checkpoint; its
        ``config`` says the architecture (trees without one are read as GPT-2).
      tokens: token ids [batch, seq], seq <= block_size.
      attention: ``"fast"`` (the fastest path: fused SDPA, or gptfn's own bfloat16 CPU
        paths), ``"sdpa"`` (always fused SDPA) or ``"reference"`` (explicit mask; same function).
      dropout: rate of inverted dropout on the embeddings and each residual branch, drawn from
        ``generator`` (an explicit ``torch.Generator``) or the global RNG.
      remat: recompute each block's activations in the backward pass instead of storing them.
      hook: ``hook(name, activation)`` sees and may replace every named activation
        (``gptfn.research.interp``).
      stop_at_layer: run only the blocks before this one and return the residual stream
        entering it [batch, seq, d_model] instead of logits (TransformerLens's argument).

    Returns:
      Logits [batch, seq, vocab].
    """
    check_tokens(params, tokens)
    if remat and generator is not None and dropout > 0:
        raise ValueError("remat replays dropout from the global RNG: pass generator=None")
    if remat and hook is not None:
        raise ValueError("remat does not combine with hooks (activation capture/patching)")
    n_layer = len(params["blocks"])
    if stop_at_layer is not None and not 0 <= stop_at_layer <= n_layer:
        raise ValueError(f"stop_at_layer must be in [0, {n_layer}], got {stop_at_layer}")
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    ctx = context(
        params, positions, attention=attention, dropout=dropout, generator=generator, hook=hook
    )
    return run_blocks(params, tokens, positions, ctx, remat=remat, stop_at_layer=stop_at_layer)


@checked
def loss(
    params: Params,
    tokens: Int[Tensor, "batch seq"],
    targets: Int[Tensor, "batch seq"],
    **forward_kwargs: Any,
) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy; positions whose target is -1 are ignored."""
    check_tokens(params, targets, "targets", allow=1)
    # forward's body: this call's check covered tokens (a second jaxtyping check of the same
    # arguments cost ~50 us a step, ~0.2 % of nanoGPT's recipe)
    logits = forward.__wrapped__(params, tokens, **forward_kwargs)  # type: ignore[attr-defined]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
