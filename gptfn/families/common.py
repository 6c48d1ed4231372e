"""What the family converters share: reading Hugging Face config dicts, moving weights between
torch's [out, in] ``nn.Linear`` layout and gptfn's per-head trees, and checking that every key of
a state dict was used."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import Any

import optree
import torch
from einops import rearrange

from gptfn.model import GPTConfig
from gptfn.model.config import RopeScaling
from gptfn.shapes import Params, Tensor

BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
           "rotary_emb.inv_freq")  # fmt: skip
"""Suffixes of non-parameter buffers that older checkpoints carry; they hold no weights."""


class Reader:
    """A state dict that remembers which keys were taken, so leftovers can be reported."""

    def __init__(self, state_dict: dict[str, Tensor], family: str) -> None:
        self.sd, self.family, self.used = state_dict, family, set()

    def __contains__(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str) -> Tensor:
        if key not in self.sd:
            raise KeyError(f"not a {self.family} state dict: missing {key!r}")
        self.used.add(key)
        return self.sd[key]

    def maybe(self, key: str) -> Tensor | None:
        return self.take(key) if key in self.sd else None

    def finish(self, ignore: Iterable[str] = ()) -> None:
        """Raise if keys remain that are neither used, ignored, nor known buffers."""
        skip = set(ignore)
        left = sorted(
            k for k in self.sd if k not in self.used and k not in skip and not k.endswith(BUFFERS)
        )
        if left:
            raise ValueError(
                f"unexpected keys for a {self.family} model: {left[:6]}"
                f"{' ...' if len(left) > 6 else ''} (another architecture, or a variant gptfn "
                "does not implement)"
            )


def first(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The value of the first of ``keys`` present (and not None) in ``hf``."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def rope_from_hf(
    hf: dict[str, Any],
    family: str,
    *,
    theta_keys: tuple[str, ...] = ("rope_theta",),
    fraction_keys: tuple[str, ...] = ("partial_rotary_factor",),
    default_fraction: float = 1.0,
    layer_type: str | None = None,
) -> dict[str, Any]:
    """``rope_theta``, ``rotary_fraction`` and ``rope_scaling`` GPTConfig fields from either
    layout of a config.json: transformers 5's ``rope_parameters`` (nested per ``layer_type``
    for Gemma 3) or the older top-level ``rope_theta`` / ``rope_scaling`` keys."""  # fmt: skip
    params = dict(hf.get("rope_parameters") or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    scaling = dict(hf.get("rope_scaling") or {})
    theta = first(params, "rope_theta", default=first(hf, *theta_keys, default=10000.0))
    fraction = first(
        params, "partial_rotary_factor", default=first(hf, *fraction_keys, default=default_fraction)
    )
    source = params if first(params, "rope_type", "type") not in (None, "default") else scaling
    out: dict[str, Any] = {"rope_theta": float(theta), "rotary_fraction": float(fraction)}
    out["rope_scaling"] = _scaling_from_hf({**hf, **source}, family)
    return out


def _scaling_from_hf(source: dict[str, Any], family: str) -> RopeScaling | None:
    """A ``RopeScaling`` from a rope_parameters / rope_scaling dict (None: plain rotary)."""
    kind = first(source, "rope_type", "type", default="default")
    context = first(source, "original_max_position_embeddings", default=0)
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling(kind, float(source["factor"]), float(source["low_freq_factor"]),
                           float(source["high_freq_factor"]), int(context))  # fmt: skip
    if kind == "linear":
        return RopeScaling(kind, float(source["factor"]))
    if kind == "longrope":
        factor = first(source, "factor", default=source["max_position_embeddings"] / context)
        attention = first(source, "attention_factor", default=None)
        if attention is None:  # Hugging Face's default, from the paper
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(context))
        return RopeScaling(kind, original_context=int(context), attention_factor=float(attention),
                           short_factor=tuple(map(float, source["short_factor"])),
                           long_factor=tuple(map(float, source["long_factor"])))  # fmt: skip
    raise ValueError(
        f"{family} with rope type {kind!r} is not supported; gptfn implements the default "
        "rotary embedding and the scalings 'llama3', 'linear', 'longrope'"
    )


def rope_to_hf(cfg: GPTConfig, *, fraction_key: str | None = None) -> dict[str, Any]:
    """The rotary part of a config.json, in transformers 5's ``rope_parameters`` (plus the
    top-level ``rope_theta`` older versions read)."""
    params = scaling_to_hf(cfg.rope_scaling) | {"rope_theta": cfg.rope_theta}
    if fraction_key is not None:
        params["partial_rotary_factor"] = cfg.rotary_fraction
    out = {"rope_parameters": params, "rope_theta": cfg.rope_theta}
    if fraction_key is not None:
        out[fraction_key] = cfg.rotary_fraction
    return out


def scaling_to_hf(scaling: RopeScaling | None) -> dict[str, Any]:
    """Hugging Face's ``rope_parameters`` keys of a scaling (``rope_type`` default: none)."""
    if scaling is None:
        return {"rope_type": "default"}
    out: dict[str, Any] = {"rope_type": scaling.kind}
    if scaling.kind == "llama3":
        out |= {
            "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_context,
        }  # fmt: skip
    elif scaling.kind == "linear":
        out["factor"] = scaling.factor
    else:
        out |= {
            "type": "longrope", "short_factor": list(scaling.short_factor),
            "long_factor": list(scaling.long_factor),
            "original_max_position_embeddings": scaling.original_context,
            "attention_factor": scaling.attention_factor,
        }  # fmt: skip
    return out


def activation(name: str, table: dict[str, str], family: str) -> str:
    """gptfn's MLP kind for a Hugging Face activation name."""
    if name not in table:
        raise ValueError(
            f"{family} with activation {name!r} is not supported; supported: {sorted(table)}"
        )
    return table[name]


def refuse_unmapped(cfg: GPTConfig, family: str, maps: frozenset[str]) -> None:
    """Raise ``ValueError`` naming every field of ``cfg`` that ``family`` does not map (not in
    ``maps``) and that is not at its default (the default given the mapped fields, so derived
    fields such as ``n_kv_head = n_head`` count as default). Every ``GPTConfig`` field is
    checked, including fields added after the family was written."""
    names = [f.name for f in dataclasses.fields(GPTConfig)]
    if unknown := sorted(maps - set(names)):
        raise TypeError(f"{family} maps fields GPTConfig does not have: {unknown}")
    default = GPTConfig(**{name: getattr(cfg, name) for name in maps})
    wrong = [
        f"{name}={getattr(cfg, name)!r} (needs {getattr(default, name)!r})"
        for name in names
        if name not in maps and getattr(cfg, name) != getattr(default, name)
    ]
    if wrong:
        raise ValueError(f"{family} cannot hold {', '.join(wrong)}")


def require(cfg: GPTConfig, family: str, wanted: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming every field of ``cfg`` that ``family`` cannot express."""
    wrong = [
        f"{name}={getattr(cfg, name)!r} (needs {value!r})"
        for name, value in wanted.items()
        if (
            getattr(cfg, name) not in value
            if isinstance(value, tuple)
            else getattr(cfg, name) != value
        )
    ]
    if wrong:
        raise ValueError(f"{family} cannot hold {', '.join(wrong)}")


def heads_in(w: Tensor, heads: int) -> Tensor:
    """An ``nn.Linear`` weight [(h k), d] as gptfn's [d, h, k] (a view)."""
    return rearrange(w, "(h k) d -> d h k", h=heads)


def heads_out(w: Tensor) -> Tensor:
    """gptfn's [d, h, k] as an ``nn.Linear`` weight [(h k), d]."""
    return rearrange(w, "d h k -> (h k) d")


def norm_in(reader: Reader, prefix: str, bias: bool | None = None) -> dict[str, Tensor]:
    """``{scale, bias}`` from ``{prefix}.weight`` / ``.bias`` (bias when present, or as asked)."""
    out = {"scale": reader.take(f"{prefix}.weight")}
    if bias or (bias is None and f"{prefix}.bias" in reader):
        out["bias"] = reader.take(f"{prefix}.bias")
    return out


def norm_out(p: Params, prefix: str, *, bias: bool = False) -> dict[str, Tensor]:
    """``{prefix}.weight`` (and ``.bias``: the tree's, or zeros when ``bias`` is required)."""
    out = {f"{prefix}.weight": p["scale"]}
    if "bias" in p or bias:
        out[f"{prefix}.bias"] = p.get("bias", torch.zeros_like(p["scale"]))
    return out


def zeros_if_none(b: Tensor | None, like: Tensor, width: int) -> Tensor:
    """A bias, or zeros of ``width`` (for formats that always store a bias)."""
    return b if b is not None else like.new_zeros(width)


class TrackedTree(dict):
    """A read-only view of a parameter tree that records which leaves were read, so an export
    can fail naming the leaves it would have dropped (:meth:`unread`)."""

    def __init__(self, tree: dict[str, Any], read: set[str] | None = None, prefix: str = ""):
        super().__init__(tree)
        self.read, self.prefix = set() if read is None else read, prefix

    def _wrap(self, key: Any, value: Any) -> Any:
        path = f"{self.prefix}{key}"
        if isinstance(value, dict):
            return TrackedTree(value, self.read, path + ".")
        if isinstance(value, list):
            return [self._wrap(f"{key}.{i}", v) for i, v in enumerate(value)]
        if isinstance(value, torch.Tensor):
            self.read.add(path)
        return value

    def __getitem__(self, key: str) -> Any:
        return self._wrap(key, super().__getitem__(key))

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401 (self.get would recurse)

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        return (self[key] for key in self)

    def items(self) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        return ((key, self[key]) for key in self)

    def unread(self, tree: dict[str, Any]) -> list[str]:
        """The leaf paths of ``tree`` that were never read through this view."""
        paths = [".".join(map(str, p)) for p in optree.tree_paths(tree)]
        return sorted(set(paths) - self.read)


# ----------------------------------------------------------------------------- Llama-shaped keys

LLAMA_NORMS = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}
"""gptfn's block norms -> the Hugging Face names of a Llama layer's norms."""

_TO_OURS = {
    "heads": lambda w, k: rearrange(w, "(h k) d -> d h k", k=k),
    "out": lambda w, k: rearrange(w, "d (h k) -> h k d", k=k),
    "head_bias": lambda b, k: b.unflatten(0, (-1, k)),
    "T": lambda w, k: w.T,
    "same": lambda w, k: w,
}
_TO_HF = {
    "heads": lambda w: rearrange(w, "d h k -> (h k) d"),
    "out": lambda w: rearrange(w, "h k d -> d (h k)"),
    "head_bias": lambda b: b.flatten(),
    "T": lambda w: w.T,
    "same": lambda w: w,
}


def layer_keys(cfg: GPTConfig, norms: dict[str, str]) -> list[tuple[str, str, str]]:
    """The key table of one Llama-shaped layer: ``(gptfn path in the block, Hugging Face name
    in the layer, how the layouts differ)``, for the leaves ``cfg`` has; ``norms`` names the
    block's norms (``ln_1``, ``ln_attn_out``, ...). Read both ways by the converters below."""
    rows = [(f"attn.w_{n}", f"self_attn.{n}_proj.weight", "heads") for n in "qkv"]
    rows.append(("attn.w_o", "self_attn.o_proj.weight", "out"))
    if cfg.qkv_bias:
        rows += [(f"attn.b_{n}", f"self_attn.{n}_proj.bias", "head_bias") for n in "qkv"]
    if cfg.bias:
        rows.append(("attn.b_o", "self_attn.o_proj.bias", "same"))
    if cfg.qk_norm:
        rows += [(f"attn.{n}_norm.scale", f"self_attn.{n}_norm.weight", "same") for n in "qk"]
    for ours, theirs in (("gate", "gate"), ("in", "up"), ("out", "down")):
        if ours != "gate" or cfg.gated:
            rows.append((f"mlp.w_{ours}", f"mlp.{theirs}_proj.weight", "T"))
            if cfg.mlp_bias:
                rows.append((f"mlp.b_{ours}", f"mlp.{theirs}_proj.bias", "same"))
    return rows + [(f"{ours}.scale", f"{theirs}.weight", "same") for ours, theirs in norms.items()]


def decoder_from_hf(
    state_dict: dict[str, Tensor],
    cfg: GPTConfig,
    family: str,
    norms: dict[str, str] = LLAMA_NORMS,
    prefix: str = "model.",
    head: str = "lm_head.weight",
) -> Params:
    """A gptfn tree from a Llama-shaped state dict (``{prefix}layers.{i}.*``, embeddings,
    final norm, ``head``), through :func:`layer_keys`; every key must be used."""
    sd = Reader(state_dict, family)
    blocks = []
    for i in range(cfg.n_layer):
        block: dict[str, Any] = {}
        for ours, theirs, how in layer_keys(cfg, norms):
            *parents, leaf = ours.split(".")
            node = block
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = _TO_OURS[how](sd.take(f"{prefix}layers.{i}.{theirs}"), cfg.d_head)
        blocks.append(block)
    params: Params = {
        "wte": sd.take(f"{prefix}embed_tokens.weight"), "blocks": blocks,
        "ln_f": {"scale": sd.take(f"{prefix}norm.weight")}, "config": cfg,
    }  # fmt: skip
    if not cfg.tie_embeddings:
        params["unembed"] = sd.take(head)
    sd.finish(ignore=[head])
    return params


def decoder_to_hf(
    params: Params,
    cfg: GPTConfig,
    norms: dict[str, str] = LLAMA_NORMS,
    prefix: str = "model.",
    head: str = "lm_head.weight",
) -> dict[str, Tensor]:
    """The Llama-shaped state dict of ``params``: :func:`decoder_from_hf` backwards."""
    sd: dict[str, Tensor] = {f"{prefix}embed_tokens.weight": params["wte"]}
    for i, block in enumerate(params["blocks"]):
        for ours, theirs, how in layer_keys(cfg, norms):
            node = block
            for name in ours.split("."):
                node = node[name]
            sd[f"{prefix}layers.{i}.{theirs}"] = _TO_HF[how](node)
    sd[f"{prefix}norm.weight"] = params["ln_f"]["scale"]
    sd[head] = params.get("unembed", params["wte"])
    return sd


def layer_pattern(flags: list[bool], on: str, off: str) -> str | None:
    """A per-layer pattern string (``on``/``off`` per layer) at its shortest period that
    repeats to ``flags``; None when every layer is on (the options' default)."""
    letters = "".join(on if f else off for f in flags)
    for period in range(1, len(letters) + 1):
        unit = letters[:period]
        if (unit * len(letters))[: len(letters)] == letters:
            return None if unit == on else unit
    return None


def window_from_hf(hf: dict[str, Any], n_layer: int) -> dict[str, Any]:
    """``sliding_window`` and ``window_pattern`` from a config.json: ``sliding_window`` (unless
    ``use_sliding_window`` is false) on the layers ``layer_types`` calls sliding (when it is
    absent: every layer from ``max_window_layers``, default 0)."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    first_windowed = hf.get("max_window_layers", 0)  # Qwen2/3 without layer_types
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= first_windowed else "full_attention" for i in range(n_layer)
    ]
    if unknown := set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer types {sorted(unknown)} are not supported")
    if window is None or "sliding_attention" not in types:
        return {"sliding_window": None}
    pattern = layer_pattern([t == "sliding_attention" for t in types], "L", "G")
    return {"sliding_window": int(window), "window_pattern": pattern}


def layer_types_to_hf(cfg: GPTConfig) -> list[str]:
    """``layer_types`` of a config.json: which layers use the sliding window."""
    return [
        "sliding_attention" if cfg.windowed(i) else "full_attention" for i in range(cfg.n_layer)
    ]


def window_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """The sliding-window keys of a Qwen-style config.json (``use_sliding_window`` and
    ``layer_types``; ``max_window_layers`` for older readers when windows start at a layer)."""
    types = layer_types_to_hf(cfg)
    windowed = [i for i, t in enumerate(types) if t == "sliding_attention"]
    return {
        "use_sliding_window": cfg.sliding_window is not None, "sliding_window": cfg.sliding_window,
        "layer_types": types, "max_window_layers": windowed[0] if windowed else cfg.n_layer,
    }  # fmt: skip
