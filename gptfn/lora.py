"""LoRA adapters for gptfn trees, and PEFT's adapter files both ways.

A LoRA adapter adds ``scale * B @ A`` (rank ``r``) to a frozen weight ``W``. Here the adapters
are a pytree of their own, beside the parameters, and :func:`merge` is a pure function that
returns a plain parameter tree, so training LoRA is ``grad`` over the adapters of
``gptfn.loss(merge(params, adapters), x, y)``, an ensemble of adapters is ``vmap`` over a
``gptfn.tree.stack`` of them, and serving is ``merge`` once.

The adapter tree mirrors the parameter tree::

    {"blocks": [{"attn": {"w_q": {"a": A, "b": B}, ...}, "mlp": {...}}, ...],  # n_layer entries
     "unembed": {"a": A, "b": B},      # only when targeted
     "lora": LoRAConfig(...)}          # static: a pytree node with no children

Every pair thinks of its weight as a linear map from ``in`` to ``out`` features, as PEFT and
``nn.Linear`` do: ``A`` is [r, in], ``B`` is [out, r] and ``B @ A`` is [out, in]. For gptfn's
``x @ W`` weights the in axes lead: ``w_q``/``w_k``/``w_v`` [d, h, k] have in = d, out = h*k
(flattened (h k)); ``w_o`` [h, k, d] has in = h*k, out = d; ``w_in``/``w_gate`` [d, f] and
``w_out`` [f, d] are [in, out]. ``unembed`` [vocab, d] is stored [out, in] already.

``w_qkv`` is one adapter over queries, keys and values together: one ``A`` [r, d] and one ``B``
whose rows are q's (h k), then k's (g k), then v's (g k). It is how GPT-2's fused ``c_attn`` and
GPT-NeoX's ``query_key_value`` load from PEFT (one module there, so one A shared by q, k and v),
and it may be asked for in :func:`init` too. Blocks may hold no adapters (PEFT's
``layers_to_transform``): their entry is an empty dict.

Scales are static: ``alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``), with per-pair
overrides in the config's ``rank_pattern`` / ``alpha_pattern`` (keyed by dotted tree paths such
as ``"blocks.0.attn.w_qkv"``), so ``grad``, ``vmap`` and optimizers see tensors only.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from einops import rearrange

from gptfn.families import hf_config
from gptfn.files import atomic_write, atomic_write_text
from gptfn.tree import register_static

TARGETS = ("w_q", "w_k", "w_v", "w_qkv", "w_o", "w_gate", "w_in", "w_out", "unembed")
"""The weights LoRA can adapt (leaf names of the parameter tree, plus the fused ``w_qkv``)."""

_GROUP = {
    "w_q": "attn",
    "w_k": "attn",
    "w_v": "attn",
    "w_qkv": "attn",
    "w_o": "attn",
    "w_gate": "mlp",
    "w_in": "mlp",
    "w_out": "mlp",
}
_IN_AXES = {"w_o": 2}  # leading axes of W that are its input features (1 for the others)
_QKV = ("w_q", "w_k", "w_v")

# model_type -> (block module prefix, {module path in a block: gptfn name}, fused q/k/v row
# layout or None, unembedding module names (the first is written)). The row layout names the
# fused module's output rows.
_FAMILIES: dict[str, tuple[str, dict[str, str], str | None, tuple[str, ...]]] = {
    "gpt2": (
        "transformer.h.{i}",
        {"attn.c_attn": "w_qkv", "attn.c_proj": "w_o", "mlp.c_fc": "w_in", "mlp.c_proj": "w_out"},
        "(three h k) r",
        ("lm_head",),
    ),
    "llama": (
        "model.layers.{i}",
        {
            "self_attn.q_proj": "w_q",
            "self_attn.k_proj": "w_k",
            "self_attn.v_proj": "w_v",
            "self_attn.o_proj": "w_o",
            "mlp.gate_proj": "w_gate",
            "mlp.up_proj": "w_in",
            "mlp.down_proj": "w_out",
        },
        None,
        ("lm_head",),
    ),
    "gpt_neox": (
        "gpt_neox.layers.{i}",
        {
            "attention.query_key_value": "w_qkv",
            "attention.dense": "w_o",
            "mlp.dense_h_to_4h": "w_in",
            "mlp.dense_4h_to_h": "w_out",
        },
        "(h three k) r",
        ("lm_head", "embed_out"),
    ),
}
for _name in ("qwen2", "mistral", "qwen3", "olmo2", "smollm3", "gemma2", "gemma3_text"):
    _FAMILIES[_name] = _FAMILIES["llama"]  # Llama's module names (Phi-3's fused ones: not yet)


@dataclass(frozen=True)
class LoRAConfig:
    """The static part of an adapter tree (``adapters["lora"]``), a pytree node with no children.

    Attributes:
      rank: the default rank r.
      alpha: the default alpha; a pair's scale is alpha / r (alpha / sqrt(r) with rslora).
      targets: the adapted weight names.
      use_rslora: rank-stabilised scaling, alpha / sqrt(r).
      rank_pattern: ``(tree path, rank)`` for pairs whose rank is not ``rank``.
      alpha_pattern: ``(tree path, alpha)`` for pairs whose alpha is not ``alpha``.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = field(default=())
    alpha_pattern: tuple[tuple[str, float], ...] = field(default=())

    @property
    def scaling(self) -> float:
        """The default scale, alpha / r (or alpha / sqrt(r))."""
        return _scale(self.alpha, self.rank, self.use_rslora)

    def rank_of(self, path: str) -> int:
        """The rank of the pair at ``path`` (e.g. ``"blocks.0.attn.w_q"``)."""
        return dict(self.rank_pattern).get(path, self.rank)

    def alpha_of(self, path: str) -> float:
        """The alpha of the pair at ``path``."""
        return dict(self.alpha_pattern).get(path, self.alpha)

    def scale(self, path: str) -> float:
        """The scale of the pair at ``path``."""
        return _scale(self.alpha_of(path), self.rank_of(path), self.use_rslora)


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


register_static(LoRAConfig, "gptfn.lora.LoRAConfig")


# ----------------------------------------------------------------------------- shapes


def _in_out(name: str, weight: torch.Tensor) -> tuple[int, int]:
    """(in, out) features of a weight named ``name``."""
    if name == "unembed":
        return weight.shape[1], weight.shape[0]
    lead = _IN_AXES.get(name, 1)
    return math.prod(weight.shape[:lead]), math.prod(weight.shape[lead:])


def _pair_shape(name: str, weights: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(in, out) of the pair ``name`` over a block group's (or the tree's) weights."""
    if name == "w_qkv":
        sizes = [_in_out(n, weights[n]) for n in _QKV]
        return sizes[0][0], sum(out for _, out in sizes)
    return _in_out(name, weights[name])


def _present(params: dict[str, Any], name: str) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(tree path, weights holding it) for every place ``name`` can be adapted."""
    if name == "unembed":
        return [("unembed", params)] if "unembed" in params else []
    leaves = _QKV if name == "w_qkv" else (name,)
    group = _GROUP[name]
    return [
        (f"blocks.{i}.{group}.{name}", block[group])
        for i, block in enumerate(params["blocks"])
        if all(leaf in block[group] for leaf in leaves)
    ]


# ----------------------------------------------------------------------------- init


def _block_index(path: str) -> int:
    """The block of a tree path (``"blocks.3.attn.w_q"`` -> 3; ``"unembed"`` sorts last)."""
    return int(path.split(".")[1]) if path.startswith("blocks.") else 1 << 30


def _check_targets(params: dict[str, Any], targets: Any) -> tuple[str, ...]:
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty sequence of names from {TARGETS}")
    targets = tuple(dict.fromkeys(targets))
    here = [t for t in TARGETS if _present(params, t)]
    for t in targets:
        if t not in TARGETS:
            kind = "a bias or norm, not a weight matrix" if _is_leaf_name(params, t) else "unknown"
            raise ValueError(f"LoRA target {t!r} is {kind}; allowed targets: {TARGETS}")
        if not _present(params, t):
            why = " (tied embeddings: the unembedding is wte)" if t == "unembed" else ""
            raise ValueError(
                f"LoRA target {t!r} is in no block of this model{why}; targets it has: {here}"
            )
    if "w_qkv" in targets and set(targets) & set(_QKV):
        raise ValueError("target 'w_qkv' adapts w_q, w_k and w_v together: drop w_q/w_k/w_v")
    return targets


def _is_leaf_name(params: dict[str, Any], name: str) -> bool:
    return any(name in block[g] for block in params["blocks"] for g in ("attn", "mlp"))


def _check_numbers(rank: Any, alpha: Any, pairs: list[tuple[str, int, int]]) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    limit = min(min(i, o) for _, i, o in pairs)
    if rank > limit:
        path, i, o = min(pairs, key=lambda p: min(p[1], p[2]))
        raise ValueError(
            f"rank={rank} exceeds min(in, out)={min(i, o)} of {path} (in {i}, out {o}); "
            f"allowed ranks for these targets: 1..{limit}"
        )
    ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if not ok or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")


def init(
    params: dict[str, Any],
    rank: int = 8,
    alpha: float = 16,
    targets: tuple[str, ...] = ("w_q", "w_v"),
    seed: int = 0,
    *,
    use_rslora: bool = False,
) -> dict[str, Any]:
    """Fresh adapters for ``params``: A as PEFT draws it (kaiming-uniform with a=sqrt(5), i.e.
    U(-1/sqrt(in), 1/sqrt(in)) like ``nn.Linear``), B zeros, so ``merge`` starts at ``params``.

    Args:
      params: a gptfn parameter tree.
      rank: r, 1..min(in, out) of every target.
      alpha: positive; the scale is alpha / r (alpha / sqrt(r) with ``use_rslora``).
      targets: names from :data:`TARGETS` present in the model.
      seed: seeds A's draws (deterministic, in block order, targets in the order given).
      use_rslora: rank-stabilised scaling.

    Returns:
      The adapter tree (layout in the module docstring), on each weight's device and dtype.
    """
    targets = _check_targets(params, targets)
    places = [(t, path, w) for t in targets for path, w in _present(params, t)]
    _check_numbers(rank, alpha, [(p, *_pair_shape(t, w)) for t, p, w in places])
    gen = torch.Generator().manual_seed(seed)
    blocks: list[dict[str, Any]] = [{} for _ in params["blocks"]]
    out: dict[str, Any] = {"blocks": blocks}
    order = {t: j for j, t in enumerate(targets)}
    for t, path, weights in sorted(places, key=lambda p: (_block_index(p[1]), order[p[0]])):
        fan_in, fan_out = _pair_shape(t, weights)
        like = weights[_QKV[0] if t == "w_qkv" else t]
        bound = 1.0 / math.sqrt(fan_in)
        a = (torch.rand(rank, fan_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        pair = {"a": a.to(like), "b": like.new_zeros(fan_out, rank)}
        if t == "unembed":
            out["unembed"] = pair
        else:
            blocks[_block_index(path)].setdefault(_GROUP[t], {})[t] = pair
    out["lora"] = LoRAConfig(rank, float(alpha), targets, use_rslora)
    return out


# ----------------------------------------------------------------------------- merge


def _deltas(
    name: str, pair: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], scale: float
) -> list[tuple[str, torch.Tensor]]:
    """(leaf name, scale * B A in the leaf's layout) for one pair."""
    delta = (pair["b"] @ pair["a"]) * scale  # [out, in]
    if name == "unembed":
        return [(name, delta)]
    if name != "w_qkv":
        return [(name, delta.T.reshape(weights[name].shape))]
    sizes = [_in_out(n, weights[n])[1] for n in _QKV]
    parts = torch.split(delta, sizes, dim=0)
    return [(n, part.T.reshape(weights[n].shape)) for n, part in zip(_QKV, parts)]


def _apply(params: dict[str, Any], adapters: dict[str, Any], sign: float) -> dict[str, Any]:
    lora: LoRAConfig = adapters["lora"]
    out = dict(params)
    blocks = list(params["blocks"])
    for i, block_pairs in enumerate(adapters["blocks"]):
        if not block_pairs:
            continue
        block = dict(blocks[i])
        for group, pairs in block_pairs.items():
            weights = dict(block[group])
            for name, pair in pairs.items():
                scale = lora.scale(f"blocks.{i}.{group}.{name}")
                for leaf, delta in _deltas(name, pair, block[group], scale):
                    weights[leaf] = weights[leaf] + sign * delta
            block[group] = weights
        blocks[i] = block
    out["blocks"] = blocks
    if "unembed" in adapters:
        ((_, delta),) = _deltas("unembed", adapters["unembed"], params, lora.scale("unembed"))
        out["unembed"] = params["unembed"] + sign * delta
    return out


def merge(params: dict[str, Any], adapters: dict[str, Any]) -> dict[str, Any]:
    """The parameters with every adapter added: ``W + scale * B @ A`` in W's layout.

    Pure and differentiable in both arguments; ``torch.func.vmap(merge, in_dims=(None, 0))``
    maps over a ``gptfn.tree.stack`` of adapters with the parameters shared.

    Args:
      params: a gptfn parameter tree (not modified).
      adapters: a tree from :func:`init` or :func:`load_peft` for the same model.

    Returns:
      A plain parameter tree (untargeted leaves are ``params``' own tensors).
    """
    return _apply(params, adapters, 1.0)


def unmerge(merged: dict[str, Any], adapters: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`merge`: ``W - scale * B @ A``. It returns the original weights up
    to float rounding only ((W + D) - D is not W bit for bit); keep ``params`` when you can.

    Args:
      merged: ``merge(params, adapters)``.
      adapters: the same adapters.

    Returns:
      The base parameter tree.
    """
    return _apply(merged, adapters, -1.0)


# ----------------------------------------------------------------------------- PEFT files

_PREFIX = "base_model.model."
_UNDERSTOOD = {
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "lora_dropout",
    "init_lora_weights", "peft_type", "task_type", "base_model_name_or_path", "revision",
    "inference_mode", "auto_mapping", "peft_version", "runtime_config", "megatron_core", "bias",
    "qalora_group_size", "eva_config",
}  # fmt: skip
"""adapter_config.json keys read, or safe to ignore: ``lora_dropout`` only acts in training; the
module-matching options are superseded by the file's own keys; ``qalora_group_size`` and
``eva_config`` only act with ``use_qalora`` (refused) or at initialisation. Any other key whose
value is not empty, false or None is refused by name."""
_INITS = (True, False, "gaussian", "eva", "orthogonal")
_CONFIG_HINTS = {
    "use_dora": " (DoRA, weight-decomposed LoRA: its magnitude vectors have no place in merge)",
    "modules_to_save": " (full copies of modules: not a LoRA adapter)",
}
_KEY_HINTS = {
    "lora_magnitude_vector": "DoRA (use_dora) is not supported: gptfn's merge is plain LoRA",
    "lora_embedding_": "LoRA on embeddings is not supported",
    "lora_B.bias": "lora_bias is not supported",
}


def _family(params: dict[str, Any], model_type: str | None) -> tuple[str, Any]:
    mtype = hf_config(params, model_type)["model_type"]
    if mtype not in _FAMILIES:
        raise ValueError(f"no PEFT module map for {mtype!r}; supported: {sorted(_FAMILIES)}")
    return mtype, _FAMILIES[mtype]


def _peft_modules(
    params: dict[str, Any], adapters: dict[str, Any], model_type: str | None
) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """(HF module path, A [r, in], B [out, r], scale) for every PEFT module to write."""
    lora: LoRAConfig = adapters["lora"]
    _, (prefix, table, fused, head) = _family(params, model_type)
    module_of = {name: path for path, name in table.items()}
    out = []
    for i, block_pairs in enumerate(adapters["blocks"]):
        pre = prefix.format(i=i)
        attn = params["blocks"][i]["attn"]
        pairs = {
            n: (p, lora.scale(f"blocks.{i}.{_GROUP[n]}.{n}"))
            for group in block_pairs.values()
            for n, p in group.items()
        }
        qkv = {n: pairs.pop(n) for n in (*_QKV, "w_qkv") if n in pairs}
        if qkv and fused is not None:
            a, b, scale = _fuse_qkv(qkv, attn)
            b = rearrange(b, f"(three h k) r -> {fused}", three=3, h=attn["w_q"].shape[1])
            out.append((f"{pre}.{module_of['w_qkv']}", a, b, scale))
            qkv = {}
        elif "w_qkv" in qkv:
            (pair, scale) = qkv.pop("w_qkv")
            sizes = [_in_out(n, attn[n])[1] for n in _QKV]
            for n, b in zip(_QKV, torch.split(pair["b"], sizes)):
                out.append((f"{pre}.{module_of[n]}", pair["a"], b, scale))
        pairs |= qkv
        out += [(f"{pre}.{module_of[n]}", p["a"], p["b"], s) for n, (p, s) in pairs.items()]
    if "unembed" in adapters:
        pair = adapters["unembed"]
        out.append((head[0], pair["a"], pair["b"], lora.scale("unembed")))
    return out


def _fuse_qkv(
    qkv: dict[str, tuple[dict[str, torch.Tensor], float]], attn: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One fused q/k/v adapter (rows (three h k)) from separate ones: A stacked, B block-wise,
    each B times its scale over the first's (1.0, exact, when the scales agree)."""
    if "w_qkv" in qkv:
        pair, scale = qkv["w_qkv"]
        return pair["a"], pair["b"], scale
    scale = next(iter(qkv.values()))[1]
    sizes = [_in_out(n, attn[n])[1] for n in _QKV]
    ranks = [qkv[n][0]["a"].shape[0] if n in qkv else 0 for n in _QKV]
    like = next(iter(qkv.values()))[0]["b"]
    b = like.new_zeros(sum(sizes), sum(ranks))
    row, col = 0, 0
    for n, size, rank in zip(_QKV, sizes, ranks):
        if n in qkv:
            pair, s = qkv[n]
            b[row : row + size, col : col + rank] = pair["b"] * (s / scale)
        row, col = row + size, col + rank
    a = torch.cat([qkv[n][0]["a"] for n in _QKV if n in qkv])
    return a, b, scale


def _peft_files(
    lora: LoRAConfig, modules: list[tuple[str, torch.Tensor, torch.Tensor, float]], mtype: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json (a dict) and the tensors of adapter_model.safetensors."""
    tensors, ranks, alphas = {}, {}, {}
    for path, a, b, scale in modules:
        rank = a.shape[0]
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = a.detach().contiguous().clone()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = b.detach().contiguous().clone()
        alpha = scale * (math.sqrt(rank) if lora.use_rslora else rank)
        if rank != lora.rank:
            ranks[path] = rank
        if rank != lora.rank or not math.isclose(alpha, lora.alpha, rel_tol=1e-12):
            alphas[path] = alpha  # with rank_pattern alone PEFT would use lora_alpha / rank
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": lora.rank, "lora_alpha": lora.alpha, "use_rslora": lora.use_rslora,
        "target_modules": [path for path, *_ in modules], "rank_pattern": ranks,
        "alpha_pattern": alphas, "fan_in_fan_out": mtype == "gpt2", "bias": "none",
        "lora_dropout": 0.0, "modules_to_save": None, "inference_mode": True,
        "use_dora": False, "init_lora_weights": True,
    }  # fmt: skip
    return config, tensors


def save_peft(
    adapters: dict[str, Any],
    folder: str | os.PathLike[str],
    params: dict[str, Any],
    *,
    model_type: str | None = None,
) -> None:
    """Write ``adapters`` as a PEFT LoRA adapter (``adapter_config.json`` and
    ``adapter_model.safetensors``) for the Hugging Face model of ``params``, so that
    ``peft.PeftModel.from_pretrained(hf_model, folder)`` computes ``merge(params, adapters)``.

    Modules are listed by full path (``target_modules``), with ``rank_pattern`` /
    ``alpha_pattern`` where a module's rank or scale is not the default. Separate q/k/v adapters
    on a fused module (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``) are written as one
    adapter of the summed rank with block-structured A and B; a ``w_qkv`` adapter on Llama or
    Qwen2 as three modules sharing A. Each file is written atomically.

    Args:
      adapters: an adapter tree.
      folder: created if missing.
      params: the base parameters (they pick the family, as ``gptfn.to_hf`` does).
      model_type: force a family (``"gpt2"``, ``"llama"``, ``"qwen2"``, ``"gpt_neox"``).
    """
    modules = _peft_modules(params, adapters, model_type)
    if not modules:
        raise ValueError("the adapter tree holds no adapters")
    config, tensors = _peft_files(adapters["lora"], modules, _family(params, model_type)[0])
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(
        out / "adapter_model.safetensors",
        lambda tmp: safetensors.torch.save_file(tensors, str(tmp), {"format": "pt"}),
    )
    atomic_write_text(out / "adapter_config.json", text)


def _read_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json, with every option gptfn cannot express refused by name."""
    if not (folder / "adapter_model.safetensors").is_file():
        hint = ""
        if (folder / "adapter_model.bin").is_file():
            hint = (
                ": only adapter_model.bin is there, which gptfn does not read (pickle). Convert "
                "it: safetensors.torch.save_file(torch.load(bin, weights_only=True), "
                "folder/'adapter_model.safetensors'), or load it with PEFT and save_pretrained "
                "with safe_serialization=True"
            )
        raise FileNotFoundError(f"no adapter_model.safetensors in {folder}{hint}")
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type {config['peft_type']!r} is not supported; only LORA")
    if config.get("bias", "none") != "none":
        raise ValueError(f"bias={config['bias']!r} is not supported (only 'none')")
    if config.get("init_lora_weights", True) not in _INITS:
        raise ValueError(
            f"init_lora_weights={config['init_lora_weights']!r} is not supported (it changes "
            f"the base weights or the layer); supported: {_INITS}"
        )
    unknown = sorted(
        k for k, v in config.items() if k not in _UNDERSTOOD and v not in (None, False, [], {}, "")
    )
    if unknown:
        what = "; ".join(f"{k}={config[k]!r}{_CONFIG_HINTS.get(k, '')}" for k in unknown)
        raise ValueError(f"adapter_config.json options gptfn cannot express: {what}")
    return config


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key that matches a suffix of ``module`` as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_modules(
    tensors: dict[str, torch.Tensor], params: dict[str, Any], mtype: str
) -> dict[str, dict[str, torch.Tensor]]:
    """{HF module path: {"a": lora_A, "b": lora_B}}; any other key is refused by name, except
    a copy of the unembedding equal to the model's (PEFT saves the base ``lm_head`` weight when
    ``lm_head`` is a target: ``save_embedding_layers="auto"``)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    heads = [f"{_PREFIX}{head}.base_layer.weight" for head in _FAMILIES[mtype][3]]
    for key, value in tensors.items():
        if key in heads:
            base = params.get("unembed", params["wte"])
            if value.shape != base.shape or not torch.equal(value.to(base), base):
                raise ValueError(
                    f"{key!r} replaces the unembedding with other weights; gptfn adapters do "
                    "not carry base weights (put them in params, or save without "
                    "save_embedding_layers)"
                )
            continue
        match = re.fullmatch(rf"{re.escape(_PREFIX)}(.+)\.lora_([AB])\.weight", key)
        if match is None:
            why = next((hint for part, hint in _KEY_HINTS.items() if part in key), "")
            raise ValueError(
                f"adapter key {key!r} is not a LoRA A/B weight gptfn can merge"
                f"{f' ({why})' if why else ''}; expected {_PREFIX}<module>.lora_A.weight / "
                ".lora_B.weight only"
            )
        modules.setdefault(match[1], {})[match[2].lower()] = value
    for module, pair in modules.items():
        if set(pair) != {"a", "b"}:
            raise ValueError(f"module {module!r} has lora_{'AB'[('a' in pair)]} but not both")
    return modules


def _locate(module: str, mtype: str, n_layer: int) -> tuple[int | None, str]:
    """(block index or None, gptfn name) of an HF module path; a clear error for others."""
    prefix, table, _, heads = _FAMILIES[mtype]
    if module in heads:
        return None, "unembed"
    pattern = re.escape(prefix).replace(re.escape("{i}"), r"(\d+)") + r"\.(.+)"
    match = re.fullmatch(pattern, module)
    if match is None or match[2] not in table or int(match[1]) >= n_layer:
        allowed = [*[prefix.format(i="<i>") + "." + m for m in table], *heads]
        raise ValueError(
            f"PEFT module {module!r} has no gptfn counterpart in a {n_layer}-block {mtype} "
            f"model; adaptable modules: {allowed}"
        )
    return int(match[1]), table[match[2]]


def _tree_pair(
    module: str,
    pair: dict[str, torch.Tensor],
    name: str,
    weights: dict[str, torch.Tensor],
    rank: int,
    fused: str | None,
) -> dict[str, torch.Tensor]:
    """A PEFT module's (A, B) as a tree pair: shapes checked, the weight's dtype and device,
    a fused q/k/v module's B rows in gptfn's (q, k, v) order."""
    fan_in, fan_out = _pair_shape(name, weights)
    if pair["a"].shape != (rank, fan_in) or pair["b"].shape != (fan_out, rank):
        raise ValueError(
            f"{module}: lora_A {tuple(pair['a'].shape)} / lora_B {tuple(pair['b'].shape)} "
            f"do not fit rank {rank}, in {fan_in}, out {fan_out}"
        )
    like = weights["w_q" if name == "w_qkv" else name]
    a, b = pair["a"].to(like), pair["b"].to(like)
    if name == "w_qkv" and fused is not None:
        b = rearrange(b, f"{fused} -> (three h k) r", three=3, h=like.shape[1])
    return {"a": a, "b": b}


def load_peft(
    folder: str | os.PathLike[str],
    params: dict[str, Any],
    *,
    model_type: str | None = None,
) -> dict[str, Any]:
    """An adapter tree from a PEFT LoRA adapter folder for the Hugging Face model of ``params``.

    Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (never a pickled .bin).
    Per-module ranks and alphas (``rank_pattern``, ``alpha_pattern``, matched as PEFT does),
    rslora, and adapters in only some blocks (``layers_to_transform``) are kept; a fused q/k/v
    module becomes a ``w_qkv`` pair. ``lora_dropout`` is ignored (it only acts in training).
    DoRA, LoRA biases, ``bias != "none"``, ``modules_to_save`` and any other option or key
    that changes the function and has no gptfn counterpart are refused by name.

    Args:
      folder: the adapter folder (as ``PeftModel.save_pretrained`` writes it).
      params: the base parameters (they pick the family and the adapters' dtype and device).
      model_type: force a family.

    Returns:
      The adapter tree, ``merge(params, adapters)`` being PEFT's merged model.
    """
    folder = Path(folder)
    config = _read_config(folder)
    mtype, (_, _, fused, _) = _family(params, model_type)
    tensors = safetensors.torch.load_file(folder / "adapter_model.safetensors")
    modules = _read_modules(tensors, params, mtype)
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    blocks: list[dict[str, Any]] = [{} for _ in params["blocks"]]
    out: dict[str, Any] = {"blocks": blocks}
    ranks, alphas, names = {}, {}, set()
    for module, pair in sorted(modules.items()):
        index, name = _locate(module, mtype, len(blocks))
        weights = params if index is None else params["blocks"][index][_GROUP[name]]
        if name not in weights and not (name == "w_qkv" and "w_q" in weights):
            raise ValueError(f"{module!r} adapts {name!r}, which this model does not have")
        path = "unembed" if index is None else f"blocks.{index}.{_GROUP[name]}.{name}"
        r = int(_pattern_value(config.get("rank_pattern") or {}, module, rank))
        if r != rank:
            ranks[path] = r
        a_m = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha))
        if a_m != alpha:
            alphas[path] = a_m
        target = out if index is None else blocks[index].setdefault(_GROUP[name], {})
        target[name] = _tree_pair(module, pair, name, weights, r, fused)
        names.add(name)
    targets = tuple(t for t in TARGETS if t in names)
    rslora = bool(config.get("use_rslora"))
    ranks_, alphas_ = tuple(sorted(ranks.items())), tuple(sorted(alphas.items()))
    out["lora"] = LoRAConfig(rank, alpha, targets, rslora, ranks_, alphas_)
    return out
