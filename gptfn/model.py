"""The GPT-2 model as pure functions of a parameter tree.

Read top to bottom: config, init, the layers (embedding, layer norm, attention, MLP, block),
then ``forward`` and ``loss``. Nothing here holds state; the architecture is read from the
shapes of the tree, so ``forward(params, tokens)`` needs nothing else.

Tree layout (d = n_embd, h = n_head, k = d // h, V = vocab, T = block_size)::

    wte [V, d]   wpe [T, d]   ln_f.{scale, bias} [d]   (unembed [V, d] only when untied)
    blocks.{i}.ln_1.{scale, bias} [d]        blocks.{i}.ln_2.{scale, bias} [d]
    blocks.{i}.attn.w_q / w_k / w_v [d, h, k]   b_q / b_k / b_v [h, k]
    blocks.{i}.attn.w_o [h, k, d]               b_o [d]
    blocks.{i}.mlp.w_in [d, 4d]  b_in [4d]      w_out [4d, d]  b_out [d]

With ``bias=False`` every ``b_*`` and every layer-norm ``bias`` is absent, which means no bias.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
from torch.nn.attention import SDPBackend, sdpa_kernel

from gptfn.remat import remat as checkpoint_block
from gptfn.typing import Float, Int, Params, Tensor, checked, is_transformed, runtime_checks_enabled

__all__ = [
    "GPTConfig",
    "attend",
    "attention_out",
    "attention_qkv",
    "block",
    "embed",
    "forward",
    "init",
    "layer_norm",
    "loss",
    "mlp",
    "unembed",
]

AttentionImpl = Literal["fast", "reference"]
Hook = Callable[[str, Tensor], Tensor]
"""``hook(name, activation) -> activation``: sees (and may replace) each named activation; the
names are listed in ``gptfn.inspect``. Used by ``run_with_cache`` / ``run_with_patches``."""


def _tap(hook: Hook | None, name: str, x: Tensor) -> Tensor:
    return x if hook is None else hook(name, x)


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of a GPT-2-style model; only :func:`init` needs it, ``forward`` reads shapes."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    bias: bool = True
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON)."""
        return asdict(self)

    @classmethod
    def from_params(cls, params: Params) -> GPTConfig:
        """Recover the config from the shapes of a parameter tree."""
        vocab_size, n_embd = params["wte"].shape
        first = params["blocks"][0]
        return cls(
            vocab_size=vocab_size,
            block_size=params["wpe"].shape[0],
            n_layer=len(params["blocks"]),
            n_head=first["attn"]["w_q"].shape[1],
            n_embd=n_embd,
            bias="b_q" in first["attn"],
            tie_embeddings="unembed" not in params,
        )


# ----------------------------------------------------------------------------- init


def init(
    cfg: GPTConfig,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Params:
    """Fresh GPT-2 parameters: N(0, 0.02) weights, N(0, 0.02/sqrt(2 n_layer)) residual outputs,
    zero biases, unit layer-norm scales. Deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    d, h, v = cfg.n_embd, cfg.n_head, cfg.vocab_size
    k = d // h
    std, resid_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)

    def normal(*shape: int, scale: float = std) -> Tensor:
        return torch.randn(shape, generator=gen) * scale

    def norm() -> dict[str, Tensor]:
        out = {"scale": torch.ones(d)}
        if cfg.bias:
            out["bias"] = torch.zeros(d)
        return out

    def block_params() -> dict[str, Any]:
        attn = {name: normal(d, h, k) for name in ("w_q", "w_k", "w_v")}
        attn["w_o"] = normal(h, k, d, scale=resid_std)
        mlp_p = {"w_in": normal(d, 4 * d), "w_out": normal(4 * d, d, scale=resid_std)}
        if cfg.bias:
            attn |= {"b_q": torch.zeros(h, k), "b_k": torch.zeros(h, k), "b_v": torch.zeros(h, k)}
            attn["b_o"] = torch.zeros(d)
            mlp_p |= {"b_in": torch.zeros(4 * d), "b_out": torch.zeros(d)}
        return {"ln_1": norm(), "attn": attn, "ln_2": norm(), "mlp": mlp_p}

    params: Params = {
        "wte": normal(v, d),
        "wpe": normal(cfg.block_size, d),
        "blocks": [block_params() for _ in range(cfg.n_layer)],
        "ln_f": norm(),
    }
    if not cfg.tie_embeddings:
        params["unembed"] = normal(v, d)
    return _to(params, dtype, device)


def _to(tree: Any, dtype: torch.dtype, device: torch.device | str | None) -> Any:
    if isinstance(tree, dict):
        return {key: _to(value, dtype, device) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_to(value, dtype, device) for value in tree]
    return tree.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- layers


def embed(
    params: Params, tokens: Int[Tensor, "batch seq"], positions: Int[Tensor, "*#batch seq"]
) -> Float[Tensor, "batch seq d_model"]:
    """Token embedding plus learned position embedding."""
    return F.embedding(tokens, params["wte"]) + F.embedding(positions, params["wpe"])


def layer_norm(
    p: Params, x: Float[Tensor, "*batch d"], eps: float = 1e-5
) -> Float[Tensor, "*batch d"]:
    """LayerNorm over the last axis; a missing ``bias`` means none."""
    return F.layer_norm(x, x.shape[-1:], p["scale"], p.get("bias"), eps)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` for ``weight`` [out, in], ``F.linear``'s convention.

    One token through half-precision weights laid out [out, in] in memory (see
    ``gptfn.generate.decode_layout``) goes through ``torch.mv``, which streams such weights
    ~1.5x faster on CPU than the general matmul: decoding one token is memory-bound.
    """
    if x.numel() == x.shape[-1] and weight.dtype in _HALF and weight.is_contiguous():
        y = torch.mv(weight, x.reshape(-1)).reshape(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


_HALF = (torch.bfloat16, torch.float16)


def _dense(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x @ w + b for w stored [in, out], as one fused addmm (``F.linear`` takes [out, in]; the
    transpose is a view). Fusing matters under autocast: a separate ``+ b`` with a float32 bias
    would promote the bfloat16 product back to float32."""
    return _linear(x, w.T, b)


def _linear_heads(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """[b s d] x [d h k] (+ [h k]) -> [b s h k] as one matmul."""
    heads = w.shape[1]
    y = _dense(
        x, rearrange(w, "d h k -> d (h k)"), None if b is None else rearrange(b, "h k -> (h k)")
    )
    return rearrange(y, "b s (h k) -> b s h k", h=heads)


def attention_qkv(
    p: Params, x: Float[Tensor, "batch seq d_model"]
) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values, each [batch seq head d_head]."""
    return tuple(_linear_heads(x, p[f"w_{n}"], p.get(f"b_{n}")) for n in "qkv")  # type: ignore[return-value]


def attend(
    q: Float[Tensor, "batch q_seq head d_head"],
    k: Float[Tensor, "batch k_seq head d_head"],
    v: Float[Tensor, "batch k_seq head d_head"],
    *,
    impl: AttentionImpl = "fast",
    mask: Tensor | None = None,
    hook: Hook | None = None,
    prefix: str = "",
) -> Float[Tensor, "batch q_seq head d_head"]:
    """Softmax attention scaled by 1/sqrt(d_head), per head: ``z`` before the output projection.

    With ``mask=None`` it is causal, query i seeing keys 0..i (queries and keys of one length).
    Otherwise ``mask`` is boolean, broadcastable to [batch head q_seq k_seq], True = may attend.
    ``impl="fast"`` calls ``F.scaled_dot_product_attention``; ``"reference"`` spells the same
    function out with an explicit mask. Under nested torch.func transforms (grad of grad,
    jvp, vmap) the fast path runs SDPA's math backend (see ``_needs_math_sdpa``). ``hook`` sees
    ``{prefix}scores`` and ``{prefix}pattern`` on the reference path only.
    """
    q, k, v = (rearrange(t, "b s h k -> b h s k") for t in (q, k, v))
    if impl == "reference":
        z = _reference_attention(q, k, v, mask, hook, prefix)
    elif impl == "fast":
        z = _sdpa(q, k, v, mask)
    else:
        raise ValueError(f"attention impl must be 'fast' or 'reference', got {impl!r}")
    return rearrange(z, "b h s k -> b s h k")


def _needs_math_sdpa() -> bool:
    """True under any torch.func transform but a single ``grad``: the fused CPU kernels have no
    batching rule (vmap would loop), no forward-mode AD (jvp) and no double backward."""
    level = torch._C._functorch.maybe_current_level()
    if level is None:
        return False
    return level >= 2 or retrieve_current_functorch_interpreter().key() != TransformType.Grad


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    kwargs: dict[str, Any] = {"is_causal": True} if mask is None else {"attn_mask": mask}
    if _needs_math_sdpa():
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _reference_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, hook: Hook | None = None, prefix: str = ""
) -> Tensor:
    scores = torch.einsum("bhqk,bhsk->bhqs", q, k) / math.sqrt(q.shape[-1])
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    scores = _tap(hook, prefix + "scores", scores.masked_fill(~mask, float("-inf")))
    pattern = _tap(hook, prefix + "pattern", scores.softmax(dim=-1))
    return torch.einsum("bhqs,bhsk->bhqk", pattern, v)


def attention_out(
    p: Params, z: Float[Tensor, "batch seq head d_head"]
) -> Float[Tensor, "batch seq d_model"]:
    """Output projection: sum over heads of z_h @ w_o[h] (+ b_o)."""
    return _dense(
        rearrange(z, "b s h k -> b s (h k)"), rearrange(p["w_o"], "h k d -> (h k) d"), p.get("b_o")
    )


def mlp(
    p: Params, x: Float[Tensor, "batch seq d_model"], hook: Hook | None = None, prefix: str = ""
) -> Float[Tensor, "batch seq d_model"]:
    """Two-layer feed-forward with tanh-approximated GELU (as GPT-2)."""
    pre = _tap(hook, prefix + "pre", _dense(x, p["w_in"], p.get("b_in")))
    post = _tap(hook, prefix + "post", F.gelu(pre, approximate="tanh"))
    return _tap(hook, prefix + "out", _dense(post, p["w_out"], p.get("b_out")))


def _dropout(x: Tensor, rate: float, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout drawing from ``generator`` (or the global RNG when None)."""
    if rate == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= rate
    return x * keep / (1.0 - rate)


def block(
    p: Params,
    x: Float[Tensor, "batch seq d_model"],
    *,
    attention: AttentionImpl = "fast",
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
    hook: Hook | None = None,
    prefix: str = "",
) -> Float[Tensor, "batch seq d_model"]:
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then + mlp(ln_2(x)). ``hook`` sees the
    block's activations under ``prefix`` (``blocks.{i}.``)."""
    x = _tap(hook, prefix + "resid_pre", x)
    q, k, v = attention_qkv(p["attn"], layer_norm(p["ln_1"], x))
    if hook is not None:
        q, k, v = (hook(f"{prefix}attn.{n}", t) for n, t in zip("qkv", (q, k, v)))
    z = _tap(
        hook, prefix + "attn.z", attend(q, k, v, impl=attention, hook=hook, prefix=prefix + "attn.")
    )
    attn_out = _tap(hook, prefix + "attn.out", attention_out(p["attn"], z))
    x = _tap(hook, prefix + "resid_mid", x + _dropout(attn_out, dropout, generator))
    mlp_out = mlp(p["mlp"], layer_norm(p["ln_2"], x), hook, prefix + "mlp.")
    return _tap(hook, prefix + "resid_post", x + _dropout(mlp_out, dropout, generator))


def unembed(
    params: Params, x: Float[Tensor, "*batch d_model"], hook: Hook | None = None
) -> Float[Tensor, "*batch vocab"]:
    """Final layer norm, then logits through the (tied unless ``unembed`` exists) embedding."""
    normed = _tap(hook, "ln_f.out", layer_norm(params["ln_f"], x))
    return _linear(normed, params.get("unembed", params["wte"]), None)


# ----------------------------------------------------------------------------- model


def check_tokens(params: Params, tokens: Tensor, name: str = "tokens", *, allow: int = 0) -> None:
    """Raise unless ``tokens`` fit the model: length <= block_size, ids in [-allow, vocab).

    The length check is free and always runs; the id check reads values, so it is skipped when
    checks are off or ``tokens`` is a torch.func/compile-traced tensor.
    """
    block_size, vocab = params["wpe"].shape[0], params["wte"].shape[0]
    if tokens.shape[-1] > block_size:
        raise ValueError(
            f"{name} has sequence length {tokens.shape[-1]}, longer than block_size {block_size}"
        )
    if tokens.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor, got dtype {tokens.dtype}")
    if runtime_checks_enabled() and not is_transformed(tokens) and tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < -allow or hi >= vocab:
            bad = lo if lo < -allow else hi
            raise ValueError(
                f"{name} contains id {bad}, outside [{-allow}, {vocab}) for this model"
            )


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
) -> Float[Tensor, "batch seq vocab"]:
    """Logits for every position of ``tokens``; pure in ``params``.

    ``attention`` picks the fused SDPA path or the explicit reference path (same function).
    ``dropout`` > 0 applies inverted dropout to the embeddings and each residual branch, drawing
    from ``generator`` (an explicit ``torch.Generator``) or the global RNG. ``remat=True``
    recomputes each block's activations in the backward pass instead of storing them.
    ``hook(name, activation)`` sees and may replace every named activation (``gptfn.inspect``).
    """
    check_tokens(params, tokens)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    if hook is None:
        x = embed(params, tokens, positions)
    else:
        x = hook("embed", F.embedding(tokens, params["wte"]))
        x = x + hook("pos_embed", F.embedding(positions, params["wpe"]).expand_as(x))
    x = _dropout(x, dropout, generator)

    def run_block(p: Params, x: Tensor, i: int) -> Tensor:
        return block(
            p,
            x,
            attention=attention,
            dropout=dropout,
            generator=generator,
            hook=hook,
            prefix=f"blocks.{i}.",
        )

    if remat:
        if generator is not None and dropout > 0:
            raise ValueError("remat replays dropout from the global RNG: pass generator=None")
        if hook is not None:
            raise ValueError("remat does not combine with hooks (activation capture/patching)")
        plain = run_block

        def run_block(p: Params, x: Tensor, i: int) -> Tensor:
            return checkpoint_block(lambda p, x: plain(p, x, i))(p, x)

    for i, p in enumerate(params["blocks"]):
        x = run_block(p, x, i)
    return unembed(params, x, hook)


@checked
def loss(
    params: Params,
    tokens: Int[Tensor, "batch seq"],
    targets: Int[Tensor, "batch seq"],
    **forward_kwargs: Any,
) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy; positions whose target is -1 are ignored."""
    check_tokens(params, targets, "targets", allow=1)
    logits = forward(params, tokens, **forward_kwargs)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
