"""Generation with a functional key/value cache.

The cache is a pytree: per layer preallocated ``k``/``v`` buffers [batch, max_len, n_kv_head,
d_head] (grouped-query models store only their key/value heads), plus ``pad`` (left padding per
row) and ``length`` (slots filled, shared by all rows), both tensors. Prefill and
decode are one function, ``extend(params, tokens, cache) -> (logits, cache)``, which runs the
same blocks as ``forward``; inside each block the attention step writes the new keys and
values at slots given as a tensor (``gptfn.model.update_cache``) and attends through a mask
built from tensors. Under ``torch.compile`` the mask covers the whole buffer, so every decode
step has the same shapes (one graph); eager code attends over the slots filled so far, which is
cheaper. Like a JAX function with donated buffers, ``extend`` writes into the cache's
buffers and returns the updated cache; keep using the returned one.

``generate(..., compile=True)`` runs two ``torch.compile(fullgraph=True)`` functions
(:func:`compiled_steps`): prefill, and a decode step whose shapes never change during a
generation, sampling included (:func:`sample_from_uniform` inverts the cumulative distribution
at a uniform drawn outside the graph), so one graph serves every token; compiled, the cache
length is rounded up to a power of two so that nearby lengths share a graph. Eager and
compiled generation draw the same uniforms, so they give the same tokens.

Prompts of different lengths are left-padded; each row gets its own positions (counted from its
first real token) and an attention mask that hides its padding, so padding never changes a row.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from gptfn.model import GPTConfig, check_tokens, context, decode_kernels, run_blocks
from gptfn.shapes import Params
from gptfn.tree import map_with_path

Cache = dict[str, Any]


_MATRIX_ROWS = {"w_q": 1, "w_k": 1, "w_v": 1, "w_o": 2, "w_in": 1, "w_gate": 1, "w_out": 1}
"""How many leading axes of each weight form the input side of its matrix ([d, h, k] -> d x hk)."""


def decode_layout(params: Params) -> Params:
    """The same tree (same shapes, same values) with each block weight stored transposed in
    memory, [out, in]. Decoding one token then streams every weight once with ``torch.mv``,
    which is faster for bfloat16/float16 weights on CPU; float32 keeps the default layout."""
    if params["wte"].dtype not in (torch.bfloat16, torch.float16):
        return params

    def pack(path: str, w: Tensor) -> Tensor:
        axes = _MATRIX_ROWS.get(path.rsplit(".", 1)[-1])
        if axes is None:
            return w
        rows = math.prod(w.shape[:axes])
        return w.reshape(rows, -1).T.contiguous().T.view(w.shape)

    return map_with_path(pack, params)


def init_cache(params: Params, batch: int, max_len: int, pad: Tensor | None = None) -> Cache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (<= block_size)."""
    cfg = GPTConfig.from_params(params)
    if max_len > cfg.block_size:
        raise ValueError(f"cache length {max_len} exceeds the model's block_size {cfg.block_size}")
    like = params["wte"]
    shape = (batch, max_len, cfg.n_kv_head, cfg.d_head)
    layers = [{"k": like.new_zeros(shape), "v": like.new_zeros(shape)} for _ in params["blocks"]]
    if pad is None:
        pad = torch.zeros(batch, dtype=torch.long, device=like.device)
    length = torch.zeros((), dtype=torch.long, device=like.device)
    return {"layers": layers, "pad": pad, "length": length}


def extend(
    params: Params, tokens: Tensor, cache: Cache, last_only: bool = False, fresh: bool = False
) -> tuple[Tensor, Cache]:
    """Run ``tokens`` [batch, n] after what the cache holds: logits [batch, n, vocab] (with
    ``last_only`` [batch, 1, vocab], the last position's), new cache. ``fresh`` promises an
    empty cache (a prefill): attention then spans the n new slots only, compiled too."""
    start, n = cache["length"], tokens.shape[1]
    max_len = cache["layers"][0]["k"].shape[1]
    if not torch.compiler.is_compiling() and int(start) + n > max_len:
        raise ValueError(f"cache holds {max_len} tokens; {int(start)} used, {n} more do not fit")
    if fresh and not torch.compiler.is_compiling() and int(start) != 0:
        raise ValueError(f"extend(..., fresh=True) needs an empty cache; {int(start)} slots used")
    check_tokens(params, tokens)
    pad = cache["pad"]
    slots = start + torch.arange(n, device=tokens.device)
    positions = (slots[None, :] - pad[:, None]).clamp(min=0)
    # mask [batch, 1, n, width]: a key is visible if it is not padding and not in the future
    # (unwritten slots are in the future); a padding query sees itself only, so no row is
    # fully masked (no NaN anywhere). Eager code attends over the slots written so far;
    # a compiled step over the whole buffer (one shape for every step); a prefill over its own
    width = n if fresh else max_len if torch.compiler.is_compiling() else int(start) + n
    key = torch.arange(width, device=tokens.device)[None, None, :]
    query = slots[None, :, None]
    mask = (((key >= pad[:, None, None]) & (key <= query)) | (key == query))[:, None]
    ctx = context(params, positions, mask=mask, caches=cache["layers"], slots=slots)
    logits = run_blocks(params, tokens, positions, ctx, last_only=last_only)
    return logits, {"layers": cache["layers"], "pad": pad, "length": start + n}


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id per row of ``logits`` [batch, vocab]: greedy at temperature 0, else sampled
    from the softmax restricted to the ``top_k`` largest and/or the ``top_p`` nucleus, with one
    uniform per row drawn from ``generator`` (see :func:`sample_from_uniform`)."""
    _check_sampling(temperature, top_k, top_p)
    uniform = torch.rand(logits.shape[:-1], generator=generator, device=logits.device)
    return sample_from_uniform(logits, uniform, temperature, top_k, top_p)


def sample_from_uniform(
    logits: Tensor,
    uniform: Tensor,
    temperature: float | Tensor = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """:func:`sample_logits` given its randomness: ``uniform`` [batch] in [0, 1) picks each
    row's token by inverting the cumulative distribution, so the whole draw is tensor code that
    compiles into one graph (no ``torch.multinomial``, no generator inside the graph).

    Args:
      logits: [batch, vocab].
      uniform: [batch] uniform draws in [0, 1) (ignored when greedy).
      temperature, top_k, top_p: as :func:`sample_logits` (not checked here); the
        temperature may be a 0-d tensor, so that changing it (to 0 included) reuses a
        compiled graph.

    Returns:
      Token ids [batch].
    """
    if top_k == 1 or (not isinstance(temperature, Tensor) and temperature == 0):
        return logits.argmax(dim=-1)
    if isinstance(temperature, Tensor):  # one graph for every temperature, 0 (greedy) included
        scaled = logits.float() / torch.where(temperature > 0, temperature, 1.0)
        sampled = _inverse_cdf(scaled, uniform, top_k, top_p)
        return torch.where(temperature > 0, sampled, logits.argmax(dim=-1))
    return _inverse_cdf(logits.float() / temperature, uniform, top_k, top_p)


def _inverse_cdf(logits: Tensor, uniform: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """The token at ``uniform`` in the cumulative distribution of the softmax of ``logits``
    (already divided by the temperature), restricted to the top-k / top-p tokens."""
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    # the first token whose cumulative mass exceeds u * total: never one of probability 0
    # (its cdf equals its predecessor's); the clamp to the last possible token guards rounding
    chosen = (cdf <= uniform[..., None] * cdf[..., -1:]).sum(dim=-1)
    ids = torch.arange(probs.shape[-1], device=probs.device)
    last_possible = torch.where(probs > 0, ids, 0).amax(dim=-1)
    return torch.minimum(chosen, last_possible)


def _left_pad(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    pad = torch.tensor([width - len(r) for r in rows], dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r:
            tokens[i, width - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
    return tokens, pad


Prompts = Sequence[Sequence[int]] | Tensor
"""A batch of prompts: a list of token-id lists (any lengths) or a 2-D integer tensor."""


def _as_prompts(prompts: Prompts) -> list[list[int]]:
    """Token-id lists from a list of id lists (or 1-D tensors) or a 2-D integer tensor."""
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2 or prompts.is_floating_point() or prompts.is_complex():
            raise ValueError(
                "prompts must be a batch: a 2-D integer tensor [batch, seq] or a list of token-id "
                f"lists; got a {prompts.ndim}-D {prompts.dtype} tensor (one prompt: ids[None] or "
                "[ids])"
            )
        return prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(
            f"prompts must be a list of token-id lists or a 2-D integer tensor, got "
            f"{type(prompts).__name__} (encode text with a tokenizer first)"
        )
    rows = []
    for i, row in enumerate(prompts):
        ids = row.tolist() if isinstance(row, Tensor) and row.ndim == 1 else row
        if (
            not isinstance(ids, Sequence)
            or isinstance(ids, (str, bytes))
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
        ):
            raise ValueError(
                f"prompt {i} must be a list of int token ids (or a 1-D integer tensor), got "
                f"{type(row).__name__}: {str(row)[:60]}"
            )
        rows.append(list(ids))
    return rows


def _prefill_and_sample(
    params: Params, tokens: Tensor, cache: Cache, uniform: Tensor, *sampling: Any
) -> tuple[Tensor, Cache]:
    """Run a prompt [batch, n] into the cache and pick each row's next token."""
    logits, cache = extend(params, tokens, cache, last_only=True, fresh=True)
    return sample_from_uniform(logits[:, -1], uniform, *sampling), cache


def _decode_and_sample(
    params: Params, token: Tensor, cache: Cache, uniform: Tensor, *sampling: Any
) -> tuple[Tensor, Cache]:
    """One decode step: run each row's last token [batch] and pick the next one. Shapes are
    the same at every step, so compiled it is one graph for the whole generation."""
    logits, cache = extend(params, token[:, None], cache)
    return sample_from_uniform(logits[:, -1], uniform, *sampling), cache


_COMPILED: dict[str, Any] = {}


def compiled_steps() -> tuple[Any, Any]:
    """The ``torch.compile``d prefill and decode steps of ``generate(..., compile=True)``:
    ``step(params, tokens, cache, uniform, temperature, top_k, top_p) -> (next ids, cache)``.
    Compiled apart with ``fullgraph=True``: prefill with shapes that may vary (prompt lengths),
    decode with static shapes, one graph per batch size, cache length and sampling setting.
    Built once per process (and cached on disk by ``torch.compile`` across processes)."""
    if not _COMPILED:
        decode_kernels.enable()  # the bfloat16 decode kernels, where this CPU has the instructions
        _COMPILED["prefill"] = torch.compile(_prefill_and_sample, fullgraph=True)
        _COMPILED["decode"] = torch.compile(_decode_and_sample, fullgraph=True, dynamic=False)
    return _COMPILED["prefill"], _COMPILED["decode"]


def _steps(params: Params, compile: bool) -> tuple[Any, Any]:
    """The prefill and decode steps, compiled or eager. Eager, bfloat16 weights on a CPU build
    the decode kernels too: one token through a weight at 1.5-2.2x ``F.linear``'s speed
    (``gptfn.model.layers.linear``)."""
    if compile:
        return compiled_steps()
    if params["wte"].dtype == torch.bfloat16 and params["wte"].device.type == "cpu":
        decode_kernels.enable()
    return _prefill_and_sample, _decode_and_sample


def _cache_length(need: int, block_size: int, compiled: bool) -> int:
    """Slots to allocate: what the generation needs; compiled, rounded up to a power of two
    (at least 64) so that nearby lengths share one decode graph."""
    if compiled:
        need = max(64, 1 << (need - 1).bit_length())
    return min(block_size, need)


def _checked_prompts(
    params: Params, prompts: Prompts, max_new_tokens: int, roll_context: bool, sampling: tuple
) -> list[list[int]]:
    """The prompts as id lists, after checking them and the sampling settings; with
    ``roll_context`` a prompt longer than the context keeps its latest block_size - 1 ids."""
    rows = _as_prompts(prompts)
    if not rows or any(len(p) == 0 for p in rows):
        raise ValueError("every prompt needs at least one token (and there must be a prompt)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_sampling(*sampling)
    block_size = GPTConfig.from_params(params).block_size
    longest = max(len(p) for p in rows)
    if longest + max_new_tokens > block_size and not roll_context:
        raise ValueError(
            f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context "
            f"(block_size {block_size}); shorten it or pass roll_context=True"
        )
    return [p[-(block_size - 1) :] for p in rows] if longest > block_size else rows


@torch.no_grad()
def generate_stream(
    params: Params,
    prompts: Prompts,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    roll_context: bool = False,
    compile: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, per step, one new token for each prompt (None for rows already stopped at EOS).

    Args:
      params: the model's tree.
      prompts: a list of token-id lists of any lengths (left-padded inside), or a 2-D integer
        tensor [batch, seq] of equal-length prompts.
      max_new_tokens: how many tokens to generate per prompt.
      temperature: 0 is greedy; otherwise logits are divided by it before sampling.
      top_k: sample only among the ``top_k`` most likely tokens.
      top_p: sample only from the smallest set of tokens whose probability reaches ``top_p``.
      seed: seed of the sampling generator (same seed, same output).
      eos_token_id: a row stops after generating this id (it is included).
      roll_context: past the context, keep generating over the latest block_size - 1 tokens
        (otherwise running past the context is an error).
      compile: run prefill and decode steps through ``torch.compile`` (see
        :func:`compiled_steps`); the same tokens as without, faster after the first call.
    """
    history = _checked_prompts(
        params, prompts, max_new_tokens, roll_context, (temperature, top_k, top_p)
    )
    device, block_size = params["wte"].device, GPTConfig.from_params(params).block_size
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    sampling = (torch.tensor(float(temperature), device=device), top_k, top_p)
    greedy, batch = temperature == 0 or top_k == 1, len(history)
    steps = _steps(params, compile)
    params = decode_layout(params)
    width = _cache_length(max(map(len, history)) + max_new_tokens, block_size, compile)

    uniform = functools.partial(_uniform, batch, device, greedy, generator)

    def prefill(keep: int) -> tuple[Tensor, Cache, int]:  # the cache over the latest tokens
        tokens, pad = _left_pad([h[-keep:] for h in history], device)
        cache = init_cache(params, batch, width, pad)
        nxt, cache = steps[0](params, tokens, cache, uniform(), *sampling)
        return nxt, cache, tokens.shape[1]

    nxt, cache, filled = prefill(block_size)
    done = [False] * batch
    for step in range(max_new_tokens):
        yield _record(nxt.tolist(), history, done, eos_token_id)
        if all(done) or step == max_new_tokens - 1:
            return
        if filled == width or _rope_switches(params, history):  # rebuild the cache
            nxt, cache, filled = prefill(block_size)
        else:
            nxt, cache = steps[1](params, nxt, cache, uniform(), *sampling)
            filled += 1


def _rope_switches(params: Params, history: list[list[int]]) -> bool:
    """Whether a row's sequence just passed a ``longrope`` model's original context: from here
    its rotary tables use the long factors, for the cached keys too, so the cache is rebuilt
    (as Hugging Face's Phi-3 drops its cache at that point)."""
    scaling = GPTConfig.from_params(params).rope_scaling
    return (
        scaling is not None
        and scaling.kind == "longrope"
        and any(len(h) == scaling.original_context + 1 for h in history)
    )


def _uniform(
    batch: int, device: torch.device, greedy: bool, generator: torch.Generator | None
) -> Tensor:
    """One uniform draw per row for sampling (zeros when greedy: nothing is drawn)."""
    if greedy:
        return torch.zeros(batch, device=device)
    return torch.rand(batch, generator=generator, device=device)


def _record(
    ids: list[int], history: list[list[int]], done: list[bool], eos_token_id: int | None
) -> list[int | None]:
    """One step's tokens, None for rows already stopped; appends to ``history`` and marks rows
    that just produced ``eos_token_id`` as done."""
    out: list[int | None] = []
    for i, t in enumerate(ids):
        out.append(None if done[i] else t)
        if not done[i]:
            history[i].append(t)
            done[i] = t == eos_token_id
    return out


def generate(
    params: Params,
    prompts: Prompts,
    max_new_tokens: int,
    **kwargs: Any,
) -> list[list[int]]:
    """New tokens for each prompt (a list of token lists of any lengths, or a 2-D integer
    tensor), stopping a row at ``eos_token_id`` (included). Keywords as
    :func:`generate_stream`; same seed, same output."""
    prompts = _as_prompts(prompts)
    results: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(params, prompts, max_new_tokens, **kwargs):
        for row, t in zip(results, step):
            if t is not None:
                row.append(t)
    return results
