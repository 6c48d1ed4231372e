"""``GPTConfig``: every architecture option, validated, carried in the tree as static data.

The config rides along in the parameter tree as ``params["config"]``. It is registered as a
pytree node with no children (its value is the node's metadata), in optree's global registry
and in ``torch.utils._pytree``, so ``optree.tree_map``, ``gptfn.tree.flatten``, ``vmap``,
``grad``, optimizers and checkpoints see tensors only and rebuild the config untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import optree
import torch.utils._pytree as torch_pytree

from gptfn.typing import Params

__all__ = ["GPTConfig", "POSITIONS", "NORMS", "MLPS", "config_of"]

POSITIONS = ("learned", "rotary", "none")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu_tanh", "gelu", "relu2", "swiglu", "geglu")
GATED_MLPS = ("swiglu", "geglu")


def _option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with one line of help (and its allowed values) for CLIs and docs."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class GPTConfig:
    """A decoder-only transformer's architecture. The defaults are GPT-2's.

    Fields left as None are derived in ``__post_init__`` (``n_kv_head = n_head``, ``d_head =
    n_embd // n_head``, ``d_mlp = 4 * n_embd``, ``qkv_bias = mlp_bias = norm_bias = bias``), so
    two configs of the same architecture compare equal however they were written. Each field's
    ``metadata["help"]`` says what it means (``dataclasses.fields(GPTConfig)``).
    """

    vocab_size: int = field(metadata={"help": "number of token ids"})
    block_size: int = field(metadata={"help": "longest sequence (context length)"})
    n_layer: int = field(metadata={"help": "number of transformer blocks"})
    n_head: int = field(metadata={"help": "attention (query) heads per block"})
    n_embd: int = field(metadata={"help": "width of the residual stream (d_model)"})
    bias: bool = _option(True, "bias on the attention output; default of the other biases")
    tie_embeddings: bool = _option(True, "unembed with the token embedding (else own matrix)")
    n_kv_head: int | None = _option(None, "key/value heads (< n_head: grouped-query attention)")
    d_head: int | None = _option(None, "width of each head (default n_embd // n_head)")
    d_mlp: int | None = _option(None, "hidden width of the MLP (default 4 * n_embd)")
    position: str = _option("learned", "position scheme", POSITIONS)
    rope_theta: float = _option(10000.0, "rotary base (position=rotary)")
    rotary_fraction: float = _option(1.0, "fraction of each head's dims that rotate")
    rope_scaling: tuple[float, float, float, int] | None = _option(
        None, "Llama-3.1 rotary scaling (factor, low_freq_factor, high_freq_factor, context)"
    )
    norm: str = _option("layernorm", "normalisation", NORMS)
    norm_eps: float = _option(1e-5, "epsilon inside the norms")
    norm_bias: bool | None = _option(None, "additive bias in the norms (default: bias)")
    mlp: str = _option("gelu_tanh", "MLP activation (swiglu/geglu are gated)", MLPS)
    mlp_bias: bool | None = _option(None, "biases in the MLP (default: bias)")
    qkv_bias: bool | None = _option(None, "biases on queries, keys, values (default: bias)")
    qk_norm: bool = _option(False, "normalise each head's queries and keys (own weights)")
    parallel_residual: bool = _option(False, "x + attn(ln_1 x) + mlp(ln_2 x) (GPT-NeoX)")
    logit_softcap: float | None = _option(None, "logits = cap * tanh(logits / cap)")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _positive_int(name, getattr(self, name))
        for name in ("n_kv_head", "d_head", "d_mlp"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.d_head is None and self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}),"
                " or give d_head"
            )
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
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        self._validate()

    def _validate(self) -> None:
        for name in (
            "bias", "tie_embeddings", "norm_bias", "mlp_bias", "qkv_bias", "qk_norm",
            "parallel_residual",
        ):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}"
                )
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(
                    f"GPTConfig.{f.name} must be one of {', '.join(choices)}; "
                    f"got {getattr(self, f.name)!r}"
                )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"GPTConfig.n_head ({self.n_head}) must be a multiple of n_kv_head "
                f"({self.n_kv_head}): each key/value head serves a whole group of query heads"
            )
        for name in ("rope_theta", "norm_eps"):
            _positive_float(name, getattr(self, name))
        if self.logit_softcap is not None:
            _positive_float("logit_softcap", self.logit_softcap)
        if not isinstance(self.rotary_fraction, (int, float)) or not 0 < self.rotary_fraction <= 1:
            raise ValueError(
                f"GPTConfig.rotary_fraction must be in (0, 1], got {self.rotary_fraction!r}"
            )
        if self.position == "rotary" and (self.rotary_dim < 2 or self.rotary_dim % 2):
            raise ValueError(
                "rotary positions rotate pairs of dims: int(d_head * rotary_fraction) = "
                f"int({self.d_head} * {self.rotary_fraction}) = {self.rotary_dim} must be even "
                "and >= 2"
            )
        if self.rope_scaling is not None and (
            len(self.rope_scaling) != 4 or self.position != "rotary"
        ):
            raise ValueError(
                "GPTConfig.rope_scaling is (factor, low_freq_factor, high_freq_factor, "
                f"original_context) for position='rotary'; got {self.rope_scaling!r}"
            )

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
        out = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            out["rope_scaling"] = list(self.rope_scaling)
        return out

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


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"GPTConfig.{name} must be a positive number, got {value!r}")


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


def config_of(params: Params) -> GPTConfig:
    """``GPTConfig.from_params(params)``: the one place the model reads its architecture."""
    return GPTConfig.from_params(params)


optree.register_pytree_node(
    GPTConfig,
    lambda cfg: ((), cfg, ()),
    lambda cfg, _children: cfg,
    namespace=getattr(optree.registry, "__GLOBAL_NAMESPACE"),
)
torch_pytree.register_pytree_node(
    GPTConfig,
    lambda cfg: ([], cfg),
    lambda _children, cfg: cfg,
    serialized_type_name="gptfn.GPTConfig",
)
