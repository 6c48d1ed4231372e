"""``GPTConfig``: every architecture option, validated, carried in the tree as static data.

The config rides along in the parameter tree as ``params["config"]``. It is registered as a
pytree node with no children (its value is the node's metadata), in optree's global registry
and in ``torch.utils._pytree``, so ``optree.tree_map``, ``gptfn.tree.flatten``, ``vmap``,
``grad``, optimizers and checkpoints see tensors only and rebuild the config untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gptfn.settings import OptionError, check_options, option
from gptfn.shapes import Params
from gptfn.tree import register_static

POSITIONS = ("learned", "rotary", "none")
NORMS = ("layernorm", "rmsnorm", "rmsnorm_plus1")
NORM_POSITIONS = ("pre", "post", "sandwich")
QK_NORM_SPANS = ("head", "projection")
MLPS = ("gelu_tanh", "gelu", "relu2", "swiglu", "geglu")
GATED_MLPS = ("swiglu", "geglu")
REQUIRED = dataclasses.MISSING


def _fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be > 0 and <= 1"


def _pattern(letters: str):
    """A check: a non-empty string of ``letters`` (a per-layer pattern)."""

    def problem(value: str) -> str | None:
        if not value or set(value) - set(letters):
            return f"must be a non-empty string of {' and '.join(letters)}"
        return None

    return problem


ROPE_SCALINGS = ("llama3", "linear", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    """A rotary frequency scaling (hashable, so configs stay hashable), Hugging Face's
    ``rope_type``: ``llama3`` (Llama 3.1: ``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_context``), ``linear`` (positions divided by ``factor``),
    ``longrope`` (Phi-3: frequencies divided per dim by ``short_factor``, or by ``long_factor``
    in a pass whose longest position passes ``original_context``; cos and sin times
    ``attention_factor``).

    Written as text (flag, TOML): ``llama3,8,1,4,8192``, ``linear,8``,
    ``longrope,CONTEXT,ATTENTION_FACTOR,short...,long...`` (as many of each), or the four
    numbers of ``llama3`` alone (as older gptfn wrote it, which checkpoints still hold)."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 0
    attention_factor: float = 1.0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @classmethod
    def from_value(cls, value: Any) -> RopeScaling:
        """From its text, a list (four numbers: llama3; or a kind and numbers), a dict of its
        fields (``to_dict`` of a config), or itself; ``TypeError`` if it is none of those."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            lists = {
                k: tuple(map(float, value.get(k, ()))) for k in ("short_factor", "long_factor")
            }
            return cls(**{**value, **lists})
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, (list, tuple)) or not value:
            raise TypeError(f"expected a rope scaling ({cls.__doc__.split(chr(10))[0][2:-2]})")
        kind, *numbers = value if str(value[0]).strip() in ROPE_SCALINGS else ("llama3", *value)
        if kind == "llama3" and isinstance(value[0], str) and value[0].strip().isalpha():
            raise TypeError(
                f"unknown rope scaling {value[0].strip()!r}; gptfn implements "
                f"{', '.join(ROPE_SCALINGS)}"
            )
        try:
            return cls._from_numbers(str(kind).strip(), [float(x) for x in numbers])
        except ValueError as err:
            raise TypeError(f"expected numbers after the kind: {err}") from None

    @classmethod
    def _from_numbers(cls, kind: str, x: list[float]) -> RopeScaling:
        want = {"llama3": "4 numbers", "linear": "1 number", "longrope": "2 + an even count"}
        sizes = {"llama3": len(x) == 4, "linear": len(x) == 1, "longrope": len(x) % 2 == 0}
        if not sizes[kind] or (kind == "longrope" and len(x) < 4):
            raise TypeError(f"{kind} scaling takes {want[kind]}, got {len(x)}: {x}")
        if kind == "llama3":
            return cls(kind, x[0], x[1], x[2], int(x[3]))
        if kind == "linear":
            return cls(kind, x[0])
        half = (len(x) - 2) // 2
        short, long = tuple(x[2 : 2 + half]), tuple(x[2 + half :])
        return cls(kind, 1.0, original_context=int(x[0]), attention_factor=x[1],
                   short_factor=short, long_factor=long)  # fmt: skip

    def problem(self) -> str | None:
        """What is wrong with these numbers, or None."""
        if self.kind not in ROPE_SCALINGS:
            return (
                f"unknown rope scaling {self.kind!r}; gptfn implements {', '.join(ROPE_SCALINGS)}"
            )
        if self.kind == "llama3" and not (
            self.factor > 0 and 0 < self.low_freq_factor < self.high_freq_factor
            and self.original_context > 0
        ):  # fmt: skip
            return "needs factor > 0, 0 < low_freq_factor < high_freq_factor, context > 0"
        if self.kind == "linear" and self.factor <= 0:
            return "needs factor > 0"
        if self.kind == "longrope" and (
            len(self.short_factor) != len(self.long_factor) or self.original_context <= 0
            or min(self.short_factor + self.long_factor) <= 0
        ):  # fmt: skip
            return "needs as many short as long factors, all > 0, and a context > 0"
        return None


@dataclass(frozen=True)
class GPTConfig:
    """A decoder-only transformer's architecture. The defaults are GPT-2's.

    Each field is declared once, here, with its help line and allowed values
    (``gptfn.settings.option``): ``gptfn train`` makes a flag and a TOML key of every field but
    ``vocab_size`` from that metadata, and the families refuse by name any field they do not
    map when it is not at its default. Fields left as None are derived in ``__post_init__``
    (``n_kv_head = n_head``, ``d_head = n_embd // n_head``, ``d_mlp = 4 * n_embd``,
    ``qkv_bias = mlp_bias = norm_bias = bias``), so two configs of the same architecture
    compare equal however they were written. A bad value raises ``gptfn.settings.OptionError``
    (a ``ValueError``) naming the field, the value and what is allowed.
    """

    vocab_size: int = option(REQUIRED, "number of token ids", low=1)
    block_size: int = option(REQUIRED, "longest sequence (context length)", low=1)
    n_layer: int = option(REQUIRED, "number of transformer blocks", low=1)
    n_head: int = option(REQUIRED, "attention (query) heads per block", low=1)
    n_embd: int = option(REQUIRED, "width of the residual stream, d_model", low=1)
    bias: bool = option(True, "bias on the attention output; default of the other biases")
    tie_embeddings: bool = option(True, "unembed with the token embedding (else own matrix)")
    n_kv_head: int | None = option(
        None, "key/value heads; fewer than n_head: grouped-query (default n_head)", low=1
    )
    d_head: int | None = option(None, "width of each head (default n_embd / n_head)", low=1)
    d_mlp: int | None = option(None, "hidden width of the MLP (default 4 * n_embd)", low=1)
    position: str = option("learned", "position scheme", choices=POSITIONS)
    rope_theta: float = option(10000.0, "rotary base (position rotary)", above=0)
    rotary_fraction: float = option(
        1.0, "share (0, 1] of each head's dims that rotate (position rotary)", check=_fraction
    )
    rope_scaling: RopeScaling | None = option(  # noqa: RUF009 (option() is a dataclass field)
        None,
        "rotary frequency scaling: llama3,FACTOR,LOW,HIGH,CONTEXT (or the 4 numbers), "
        "linear,FACTOR, longrope,CONTEXT,ATTENTION_FACTOR,SHORT...,LONG...",
        check=RopeScaling.problem,
    )
    norm: str = option(
        "layernorm", "normalisation (rmsnorm_plus1: x * (1 + scale) in float32, Gemma)",
        choices=NORMS,
    )  # fmt: skip
    norm_eps: float = option(1e-5, "epsilon inside the norms", above=0)
    norm_bias: bool | None = option(None, "additive bias in the norms (default: as bias)")
    mlp: str = option("gelu_tanh", "MLP activation (swiglu, geglu: gated)", choices=MLPS)
    mlp_bias: bool | None = option(None, "biases in the MLP (default: as bias)")
    qkv_bias: bool | None = option(None, "biases on queries, keys, values (default: as bias)")
    qk_norm: bool = option(False, "normalise each head's queries and keys (own weights)")
    parallel_residual: bool = option(False, "x + attn(ln_1 x) + mlp(ln_2 x) (GPT-NeoX)")
    logit_softcap: float | None = option(
        None, "soft-cap the logits: cap * tanh(logits / cap) (default: none)", above=0
    )
    sliding_window: int | None = option(
        None, "windowed layers attend to the latest N positions only, their own included "
        "(default: the whole context)", low=1,
    )  # fmt: skip
    window_pattern: str | None = option(
        None, "which layers the sliding window applies to: L (local, windowed) or G (global) per "
        "layer, the string repeated over the layers (default: all; Gemma 2: LG)",
        check=_pattern("LG"),
    )  # fmt: skip
    rope_local_theta: float | None = option(
        None, "rotary base of the windowed layers, which then skip rope_scaling (default: "
        "rope_theta; Gemma 3: 10000)", above=0,
    )  # fmt: skip
    rope_layers: str | None = option(
        None, "which layers rotate: R (rotary) or N (no positions) per layer, the string "
        "repeated over the layers (default: all; SmolLM3's no_rope_layers)", check=_pattern("RN"),
    )  # fmt: skip
    norm_position: str = option(
        "pre", "where each branch's norm sits: pre (its input), post (its output, before the "
        "residual add: OLMo-2), sandwich (both: Gemma 2/3)", choices=NORM_POSITIONS,
    )  # fmt: skip
    qk_norm_span: str = option(
        "head", "what qk_norm normalises: each head, or the whole projection (n_head * d_head) "
        "before heads split (OLMo-2)", choices=QK_NORM_SPANS,
    )  # fmt: skip
    embed_scale: bool = option(
        False, "multiply the token embedding by sqrt(n_embd), rounded to the model dtype (Gemma)"
    )
    attn_scale: float | None = option(
        None, "scale of the attention scores (default 1/sqrt(d_head); Gemma: "
        "query_pre_attn_scalar ** -0.5)", above=0,
    )  # fmt: skip
    attn_softcap: float | None = option(
        None, "soft-cap the attention scores: cap * tanh(scores / cap) (Gemma 2; default none)",
        above=0,
    )  # fmt: skip

    def __post_init__(self) -> None:
        try:
            check_options(self)
        except OptionError as err:
            raise OptionError(f"GPTConfig.{err.name}", err.value, err.problem) from None
        if self.d_head is None and self.n_embd % self.n_head:
            raise OptionError(
                "GPTConfig.n_embd", self.n_embd,
                f"must be a multiple of n_head ({self.n_head}), or give d_head",
            )  # fmt: skip
        derived = {
            "n_kv_head": self.n_head,
            "d_head": self.n_embd // self.n_head,
            "d_mlp": 4 * self.n_embd,
            "norm_bias": self.bias,
            "mlp_bias": self.bias,
            "qkv_bias": self.bias,
        }
        for name, value in derived.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        """The checks that involve more than one field."""
        if self.n_head % self.n_kv_head:
            raise OptionError(
                "GPTConfig.n_kv_head", self.n_kv_head,
                f"must divide n_head ({self.n_head}): each key/value head serves a whole group "
                "of query heads",
            )  # fmt: skip
        if self.position == "rotary" and (self.rotary_dim < 2 or self.rotary_dim % 2):
            raise OptionError(
                "GPTConfig.rotary_fraction", self.rotary_fraction,
                "rotary positions turn pairs of dims: int(d_head * rotary_fraction) = "
                f"int({self.d_head} * {self.rotary_fraction}) = {self.rotary_dim} must be even "
                "and >= 2",
            )  # fmt: skip
        if self.rope_scaling is not None and self.position != "rotary":
            raise OptionError(
                "GPTConfig.rope_scaling", self.rope_scaling, "needs position='rotary'"
            )
        scaling = self.rope_scaling
        longrope = scaling is not None and scaling.kind == "longrope"
        if longrope and len(scaling.short_factor) != self.rotary_dim // 2:
            raise OptionError(
                "GPTConfig.rope_scaling", scaling,
                f"longrope needs rotary_dim / 2 = {self.rotary_dim // 2} factors of each kind",
            )  # fmt: skip
        needs = {
            "window_pattern": ("a sliding_window", self.sliding_window is not None),
            "rope_local_theta": (
                "rotary positions and a sliding_window",
                self.position == "rotary" and self.sliding_window is not None,
            ),
            "rope_layers": ("position='rotary'", self.position == "rotary"),
            "qk_norm_span": ("qk_norm", self.qk_norm),
        }
        for name, (what, present) in needs.items():
            if getattr(self, name) not in (None, "head") and not present:
                raise OptionError(f"GPTConfig.{name}", getattr(self, name), f"needs {what}")

    def windowed(self, layer: int) -> bool:
        """Whether block ``layer`` attends through the sliding window."""
        pattern = self.window_pattern or "L"
        return self.sliding_window is not None and pattern[layer % len(pattern)] == "L"

    def rotates(self, layer: int) -> bool:
        """Whether block ``layer`` applies rotary positions."""
        pattern = self.rope_layers or "R"
        return self.position == "rotary" and pattern[layer % len(pattern)] == "R"

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dims rotate (the first ones; 0 without rotary positions)."""
        return int(self.d_head * self.rotary_fraction) if self.position == "rotary" else 0

    @property
    def gated(self) -> bool:
        """Whether the MLP has a gate projection (SwiGLU / GeGLU)."""
        return self.mlp in GATED_MLPS

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON); every field explicit."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        """Inverse of :meth:`to_dict`; older, smaller dicts take today's defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_params(cls, params: Params) -> GPTConfig:
        """The tree's config: ``params["config"]`` when present; otherwise (trees from older
        gptfn, or built by hand) a GPT-2 config read from the tensor shapes."""
        cfg = params.get("config")
        if isinstance(cfg, GPTConfig):
            return cfg
        if cfg is not None:
            raise TypeError(f"params['config'] must be a GPTConfig, got {type(cfg).__name__}")
        return _infer_gpt2(params)


def _infer_gpt2(params: Params) -> GPTConfig:
    if "wpe" not in params or "wte" not in params:
        missing = [k for k in ("wte", "wpe") if k not in params]
        raise ValueError(
            f"this tree has no 'config' and no {missing}: only GPT-2 trees can be read from their "
            "shapes; attach the architecture as params['config'] = GPTConfig(...)"
        )
    vocab_size, n_embd = params["wte"].shape
    first = params["blocks"][0]
    return GPTConfig(
        vocab_size=vocab_size,
        block_size=params["wpe"].shape[0],
        n_layer=len(params["blocks"]),
        n_head=first["attn"]["w_q"].shape[1],
        n_embd=n_embd,
        bias="b_o" in first["attn"],
        tie_embeddings="unembed" not in params,
        d_head=first["attn"]["w_q"].shape[2],
        d_mlp=first["mlp"]["w_in"].shape[1],
        qkv_bias="b_q" in first["attn"],
        mlp_bias="b_in" in first["mlp"],
        norm_bias="bias" in first["ln_1"],
    )


register_static(GPTConfig, "gptfn.GPTConfig")
