"""The layers as pure functions: linear maps, embeddings, norms, rotary positions, MLPs.

Each takes its parameter subtree and the activations; those with named activations also take
the pass's :class:`~gptfn.model.context.Context`, whose prefix names them (``blocks.0.ln_1.``)
and whose hook sees them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gptfn.model import decode_kernels
from gptfn.model.config import GPTConfig
from gptfn.model.context import Context
from gptfn.shapes import Float, Int, Params, Tensor
from gptfn.tracing import plain_eager

# ----------------------------------------------------------------------------- linear maps


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` for ``weight`` [out, in], ``F.linear``'s convention.

    One token through half-precision weights (a decode step) is bound by reading the weight
    once. Eager, ``F.linear`` reads it fastest with the weight contiguous as [out, in]
    (``gptfn.generation.decode_layout`` stores them so; ``load_pretrained`` loads them so).
    Compiled, a multiply-and-sum over each row is faster still: inductor fuses it into the
    step's loops, streaming the weight once, where ``mm`` calls oneDNN's matrix-vector kernel.
    Measured on this 2-core AVX-512 CPU (torch 2.13, bfloat16, 2 threads), a compiled decode
    step of a 4-layer Llama-3.2-1B shape: 45 ms with ``mm``, 27.5 ms as a sum. With bfloat16
    weights and activations on a CPU with AVX512-BF16, once
    ``gptfn.model.decode_kernels.enable()`` has built it (``generate`` does), a hand-written
    kernel is faster again, compiled and eager (without gradients, outside torch.func
    transforms: the kernel has neither a derivative nor a batching rule). Eager, one row
    through weights of Llama-3.2-1B's shapes, ``F.linear`` takes 1.5-2.2x the kernel's time
    (2,048 x 8,192: 1,135 vs 602 us).
    """
    compiling = torch.compiler.is_compiling()
    if not _streams_better(x, weight):
        return F.linear(x, weight, bias)
    if _gemv_fits(x, weight) and (compiling or plain_eager(x, weight, bias)):
        y = decode_kernels.gemv_bf16(weight, x.reshape(-1).contiguous())
    elif compiling:
        y = (weight.float() * x.reshape(1, -1).float()).sum(-1)
    else:
        return F.linear(x, weight, bias)
    y = y if bias is None else y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def _streams_better(x: Tensor, weight: Tensor) -> bool:
    """Whether ``linear`` is one row through a half-precision [out, in]-contiguous weight."""
    half = weight.dtype in (torch.bfloat16, torch.float16)
    return half and x.numel() == x.shape[-1] and weight.ndim == 2 and weight.stride(-1) == 1


def _gemv_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether :mod:`gptfn.model.decode_kernels`' matrix-vector kernel is built and takes this
    one-row ``linear``."""
    bf16 = x.dtype == weight.dtype == torch.bfloat16
    return (
        decode_kernels.available()
        and bf16
        and weight.device.type == "cpu"
        and weight.is_contiguous()
    )


def dense(x: Tensor, w: Tensor, b: Tensor | None, in_dims: int = 1) -> Tensor:
    """``x @ w + b`` for ``w`` stored [in..., out...]: x's last ``in_dims`` axes contract with
    w's first ones ([b s d] x [d h k] -> [b s h k]; [b s h k] x [h k d] with ``in_dims=2``),
    as one ``matmul`` (which folds x's leading axes itself), or ``addmm`` on 2-D views with a
    bias, fused: under autocast a separate ``+ b`` with a float32 bias would promote the
    bfloat16 product back to float32.

    Written with torch views rather than ``F.linear`` on ``w.T`` (or einops): each view is an
    autograd node, and on nanoGPT's 4 x 128 recipe the transposes, flattens and unflattens
    around ~25 matmuls were ~50 extra nodes in the backward pass, ~1.5 % of it. Without a bias,
    ``x @ w`` rather than reshaping x to rows and back: nanoGPT's eager step 2-3 % faster
    (three interleaved runs) and 56 fewer nodes in its compiled graph (145, nanoGPT's 140)."""
    rows_in = math.prod(w.shape[:in_dims])
    w2 = w if w.ndim == 2 and in_dims == 1 else w.reshape(rows_in, -1)  # a view, as stored
    if _one_row_through_rows(x, w2) and _kernel_or_compiled(x, w2, b):  # see ``linear``
        y = linear(x.reshape(-1, rows_in), w2.T, None if b is None else b.reshape(-1))
    elif b is None:  # one matmul node (it folds the leading axes itself)
        y = (x if in_dims == 1 else x.flatten(-in_dims)) @ w2
        return y if w.ndim == in_dims + 1 else y.unflatten(-1, w.shape[in_dims:])
    else:
        y = torch.addmm(b.reshape(-1), x.reshape(-1, rows_in), w2)
    return y.view(*x.shape[: x.ndim - in_dims], *w.shape[in_dims:])


def _kernel_or_compiled(x: Tensor, w2: Tensor, b: Tensor | None) -> bool:
    """Compiling, or eager where ``linear`` would take the built decode kernel (else eager
    keeps ``x @ w2``)."""
    if torch.compiler.is_compiling():
        return True
    return plain_eager(x, w2, b) and _gemv_fits(x, w2.T)


def _one_row_through_rows(x: Tensor, w2: Tensor) -> bool:
    """``_streams_better(x as rows, w2.T)`` without making either (graph nodes) to ask."""
    half = w2.dtype in (torch.bfloat16, torch.float16)
    return half and x.numel() == w2.shape[0] and w2.stride(0) == 1


# ----------------------------------------------------------------------------- embeddings


def embed(
    params: Params,
    tokens: Int[Tensor, "batch seq"],
    positions: Int[Tensor, "*#batch seq"],
    ctx: Context | None = None,
) -> Float[Tensor, "batch seq d_model"]:
    """Token embedding (``embed``; times sqrt(n_embd) with ``embed_scale``), plus the learned
    position embedding (``pos_embed``) when the tree has one (``wpe``)."""
    ctx = Context(GPTConfig.from_params(params)) if ctx is None else ctx
    x = F.embedding(tokens, params["wte"])
    if ctx.cfg.embed_scale:  # sqrt(d) as float32, then the model's dtype, as Hugging Face
        x = x * torch.tensor(x.shape[-1] ** 0.5).to(x.dtype)
    x = ctx.tap("embed", x)
    if "wpe" in params:
        x = x + ctx.tap("pos_embed", F.embedding(positions, params["wpe"]).expand_as(x))
    return x


def rotary_tables(
    cfg: GPTConfig, positions: Tensor, theta: float | None = None, scaled: bool = True
) -> tuple[Tensor, Tensor]:
    """``cos, sin`` [*positions.shape, rotary_dim / 2] of the rotary angles, at base ``theta``
    (default ``cfg.rope_theta``), with ``cfg.rope_scaling`` unless ``scaled`` is False.

    Angles are computed in float32 whatever the model's dtype, as Hugging Face and the
    reference implementations do, so a float64 model reproduces them exactly (they are
    constants: derivatives with respect to the parameters stay exact). ``longrope`` picks its
    long factors for a row whose longest position passes the original context (Hugging Face
    decides per call; a row here is one of its calls), as a tensor ``where``: no graph break.
    """
    rot, theta = cfg.rotary_dim, cfg.rope_theta if theta is None else theta
    device = positions.device
    exponents = torch.arange(0, rot, 2, dtype=torch.int64, device=device).float() / rot
    inv_freq, gain, scaling = 1.0 / (theta**exponents), 1.0, cfg.rope_scaling if scaled else None
    if scaling is not None and scaling.kind == "llama3":
        inv_freq = _llama3_scaling(
            inv_freq, scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
            scaling.original_context,
        )  # fmt: skip
    elif scaling is not None and scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling is not None:  # longrope
        short, long = (
            1.0 / (torch.tensor(f, dtype=torch.float32, device=device) * theta**exponents)
            for f in (scaling.short_factor, scaling.long_factor)
        )
        longer = positions.amax(-1, keepdim=True)[..., None] + 1 > scaling.original_context
        inv_freq, gain = torch.where(longer, long, short), scaling.attention_factor
    angles = positions[..., None].float() * inv_freq
    return angles.cos() * gain, angles.sin() * gain


def _llama3_scaling(
    inv_freq: Tensor, factor: float, low: float, high: float, context: int
) -> Tensor:
    """Llama-3.1's frequency scaling: long wavelengths slowed by ``factor``, short ones kept,
    a smooth blend in between."""
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, scaled)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of each head of ``x`` [b s h k] in
    Hugging Face's "rotate half" layout (pairs are dims i and i + rot/2); ``cos``/``sin`` are
    [(b) s rot/2] and broadcast over heads."""
    half = cos.shape[-1]
    cos, sin = cos[..., None, :].to(x.dtype), sin[..., None, :].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    rotated = (x1 * cos - x2 * sin, x2 * cos + x1 * sin)
    return torch.cat([*rotated, rest] if rest.shape[-1] else rotated, dim=-1)


# ----------------------------------------------------------------------------- norms


def layer_norm(
    p: Params, x: Float[Tensor, "*batch d"], eps: float = 1e-5
) -> Float[Tensor, "*batch d"]:
    """LayerNorm over the last axis; a missing ``bias`` means none."""
    return F.layer_norm(x, x.shape[-1:], p["scale"], p.get("bias"), eps)


def _rms_norm(p: Params, x: Tensor, eps: float) -> Tensor:
    """RMSNorm in at least float32 (bfloat16 inputs are upcast, as Llama does); the result is
    scaled in the input's dtype."""
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    x = p["scale"] * x
    return x if "bias" not in p else x + p["bias"]


def _rms_norm_plus1(p: Params, x: Tensor, eps: float) -> Tensor:
    """Gemma's RMSNorm: ``x / rms * (1 + scale)`` all in at least float32, then the input's
    dtype."""
    wide = torch.promote_types(x.dtype, torch.float32)
    y = x.to(wide)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + p["scale"].to(wide))
    return y.to(x.dtype) if "bias" not in p else y.to(x.dtype) + p["bias"]


def norm(p: Params, x: Float[Tensor, "*batch d"], ctx: Context) -> Float[Tensor, "*batch d"]:
    """The config's norm (LayerNorm, RMSNorm, or Gemma's RMSNorm with ``1 + scale``; with or
    without bias) over the last axis.

    A hook that wants ``{prefix}rms`` or ``{prefix}normalized`` gets the norm taken apart:
    ``rms`` = sqrt(mean(x_c^2) + eps) [... 1] (x_c centred for LayerNorm, x for RMSNorm) and
    ``normalized`` = x_c / rms, before the affine scale and bias. ``{prefix}out`` is the result.
    """
    cfg = ctx.cfg
    if ctx.wants("rms") or ctx.wants("normalized"):
        centred = x - x.mean(-1, keepdim=True) if cfg.norm == "layernorm" else x
        rms = ctx.tap("rms", (centred.pow(2).mean(-1, keepdim=True) + cfg.norm_eps).sqrt())
        scale = p["scale"] + 1 if cfg.norm == "rmsnorm_plus1" else p["scale"]
        out = ctx.tap("normalized", centred / rms) * scale
        out = out if "bias" not in p else out + p["bias"]
    elif cfg.norm == "layernorm":
        out = F.layer_norm(x, x.shape[-1:], p["scale"], p.get("bias"), cfg.norm_eps)
    elif cfg.norm == "rmsnorm_plus1":
        out = _rms_norm_plus1(p, x, cfg.norm_eps)
    else:
        out = _rms_norm(p, x, cfg.norm_eps)
    return ctx.tap("out", out)


# ----------------------------------------------------------------------------- MLP

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu2": lambda x: F.relu(x).square(),
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}


def mlp(
    p: Params, x: Float[Tensor, "batch seq d_model"], ctx: Context
) -> Float[Tensor, "batch seq d_model"]:
    """Feed-forward: ``w_out(act(w_in x))``, or gated ``w_out(act(w_gate x) * w_in x)`` for
    swiglu (SiLU gate, Llama) and geglu (tanh-GELU gate, Gemma). Names as TransformerLens:
    ``pre`` is the activation's input (``w_in x``, or ``w_gate x`` when gated), gated MLPs add
    ``pre_linear`` (``w_in x``), ``post`` is what ``w_out`` reads, ``out`` the result."""
    act = _ACTIVATIONS[ctx.cfg.mlp]
    if "w_gate" in p:
        gate = ctx.tap("pre", dense(x, p["w_gate"], p.get("b_gate")))
        linear_part = ctx.tap("pre_linear", dense(x, p["w_in"], p.get("b_in")))
        post = ctx.tap("post", act(gate) * linear_part)
    else:
        post = ctx.tap("post", act(ctx.tap("pre", dense(x, p["w_in"], p.get("b_in")))))
    return ctx.tap("out", dense(post, p["w_out"], p.get("b_out")))
