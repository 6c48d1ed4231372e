"""The layers as pure functions: linear maps, embeddings, norms, rotary positions, MLPs, dropout.

Each takes its parameter subtree and the activations, and sees the hook (if any) under a name
prefix. Hooks: ``hook(name, x) -> x`` sees and may replace a named activation. Names that cost
extra work to produce (a norm taken apart into its normalised value and its scale, the
per-head attention result, the per-head inputs) are computed only when the hook ``wants``
them: a hook with a ``wants(name)`` method is asked; a plain function wants everything.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from gptfn.model.config import GPTConfig
from gptfn.typing import Float, Int, Params, Tensor

__all__ = [
    "Hook",
    "embed",
    "layer_norm",
    "mlp",
    "norm",
    "rotary_tables",
    "apply_rotary",
]

Hook = Callable[[str, Tensor], Tensor]
"""``hook(name, activation) -> activation``; see the module docstring and ``gptfn.inspect``."""


def tap(hook: Hook | None, name: str, x: Tensor) -> Tensor:
    """``hook(name, x)``, or ``x`` when there is no hook."""
    return x if hook is None else hook(name, x)


def wants(hook: Hook | None, name: str) -> bool:
    """Whether ``hook`` asks for ``name`` (for activations that cost extra to produce)."""
    if hook is None:
        return False
    ask = getattr(hook, "wants", None)
    return True if ask is None else bool(ask(name))


# ----------------------------------------------------------------------------- linear maps

_HALF = (torch.bfloat16, torch.float16)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` for ``weight`` [out, in], ``F.linear``'s convention.

    One token through half-precision weights laid out [out, in] in memory (see
    ``gptfn.generation.decode_layout``) goes through ``torch.mv``, which streams such weights
    ~1.5x faster on CPU than the general matmul: decoding one token is memory-bound.
    """
    if x.numel() == x.shape[-1] and weight.dtype in _HALF and weight.is_contiguous():
        y = torch.mv(weight, x.reshape(-1)).reshape(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def dense(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """x @ w + b for w stored [in, out], as one fused addmm (``F.linear`` takes [out, in]; the
    transpose is a view). Fusing matters under autocast: a separate ``+ b`` with a float32 bias
    would promote the bfloat16 product back to float32."""
    return linear(x, w.T, b)


def linear_heads(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """[b s d] x [d h k] (+ [h k]) -> [b s h k] as one matmul."""
    heads = w.shape[1]
    y = dense(
        x, rearrange(w, "d h k -> d (h k)"), None if b is None else rearrange(b, "h k -> (h k)")
    )
    return rearrange(y, "b s (h k) -> b s h k", h=heads)


# ----------------------------------------------------------------------------- embeddings


def embed(
    params: Params, tokens: Int[Tensor, "batch seq"], positions: Int[Tensor, "*#batch seq"]
) -> Float[Tensor, "batch seq d_model"]:
    """Token embedding, plus the learned position embedding when the tree has one (``wpe``)."""
    x = F.embedding(tokens, params["wte"])
    return x + F.embedding(positions, params["wpe"]) if "wpe" in params else x


def rotary_tables(cfg: GPTConfig, positions: Tensor) -> tuple[Tensor, Tensor]:
    """``cos, sin`` [*positions.shape, rotary_dim / 2] of the rotary angles.

    Angles are computed in float32 whatever the model's dtype, as Hugging Face and the
    reference implementations do, so a float64 model reproduces them exactly (they are
    constants: derivatives with respect to the parameters stay exact).
    """
    rot = cfg.rotary_dim
    inv_freq = 1.0 / (
        cfg.rope_theta
        ** (torch.arange(0, rot, 2, dtype=torch.int64, device=positions.device).float() / rot)
    )
    if cfg.rope_scaling is not None:
        inv_freq = _llama3_scaling(inv_freq, *cfg.rope_scaling)
    angles = positions[..., None].float() * inv_freq
    return angles.cos(), angles.sin()


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


def norm(
    p: Params,
    x: Float[Tensor, "*batch d"],
    cfg: GPTConfig,
    hook: Hook | None = None,
    prefix: str = "",
) -> Float[Tensor, "*batch d"]:
    """The config's norm (LayerNorm or RMSNorm, with or without bias) over the last axis.

    A hook that wants ``{prefix}rms`` or ``{prefix}normalized`` gets the norm taken apart:
    ``rms`` = sqrt(mean(x_c^2) + eps) [... 1] (x_c centred for LayerNorm, x for RMSNorm) and
    ``normalized`` = x_c / rms, before the affine scale and bias. ``{prefix}out`` is the result.
    """
    if wants(hook, prefix + "rms") or wants(hook, prefix + "normalized"):
        centred = x - x.mean(-1, keepdim=True) if cfg.norm == "layernorm" else x
        rms = tap(
            hook, prefix + "rms", (centred.pow(2).mean(-1, keepdim=True) + cfg.norm_eps).sqrt()
        )
        out = tap(hook, prefix + "normalized", centred / rms) * p["scale"]
        out = out if "bias" not in p else out + p["bias"]
    elif cfg.norm == "layernorm":
        out = F.layer_norm(x, x.shape[-1:], p["scale"], p.get("bias"), cfg.norm_eps)
    else:
        out = _rms_norm(p, x, cfg.norm_eps)
    return tap(hook, prefix + "out", out)


# ----------------------------------------------------------------------------- MLP

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu2": lambda x: F.relu(x).square(),
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}


def mlp(
    p: Params,
    x: Float[Tensor, "batch seq d_model"],
    activation: str = "gelu_tanh",
    *,
    hook: Hook | None = None,
    prefix: str = "",
) -> Float[Tensor, "batch seq d_model"]:
    """Feed-forward: ``w_out(act(w_in x))``, or gated ``w_out(act(w_gate x) * w_in x)`` for
    swiglu (SiLU gate, Llama) and geglu (tanh-GELU gate, Gemma). Names as TransformerLens:
    ``pre`` is the activation's input (``w_in x``, or ``w_gate x`` when gated), gated MLPs add
    ``pre_linear`` (``w_in x``), ``post`` is what ``w_out`` reads, ``out`` the result."""
    try:
        act = _ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(
            f"unknown MLP activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}"
        ) from None
    if "w_gate" in p:
        gate = tap(hook, prefix + "pre", dense(x, p["w_gate"], p.get("b_gate")))
        linear_part = tap(hook, prefix + "pre_linear", dense(x, p["w_in"], p.get("b_in")))
        post = tap(hook, prefix + "post", act(gate) * linear_part)
    else:
        post = tap(
            hook,
            prefix + "post",
            act(tap(hook, prefix + "pre", dense(x, p["w_in"], p.get("b_in")))),
        )
    return tap(hook, prefix + "out", dense(post, p["w_out"], p.get("b_out")))


def dropout(x: Tensor, rate: float, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout drawing from ``generator`` (or the global RNG when None)."""
    if rate == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= rate
    return x * keep / (1.0 - rate)
