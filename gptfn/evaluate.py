"""Evaluation: perplexity (non-overlapping or sliding windows) and BLEU of continuations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptfn.checkpoint import load_run
from gptfn.compiling import jit
from gptfn.data import load_meta, load_tokens
from gptfn.data.tokenizers import Tokenizer, load_tokenizer, tokenizer_mismatch
from gptfn.generation import generate
from gptfn.model import GPTConfig, forward
from gptfn.shapes import Params


def windows(
    n_tokens: int, block_size: int, stride: int | None = None
) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored)`` windows over a sequence of ``n_tokens`` ids such that every
    target (ids 1..n-1) is scored exactly once. Without ``stride`` windows do not overlap; with it
    they advance by ``stride`` and each target gets at least ``block_size - stride`` context."""
    stride = block_size if stride is None else stride
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    out, scored_upto, start = [], 1, 0  # targets [1, scored_upto) are done
    while scored_upto < n_tokens:
        end = min(start + block_size + 1, n_tokens)  # inputs [start, end-1), targets (start, end)
        out.append((start, end, scored_upto))
        scored_upto = end
        start += stride
        if start + 1 >= n_tokens:
            break
    return out


def _nll_sum(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the targets ``y`` (-1: not scored) given ``x``."""
    logits = forward(params, x)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum"
    )


@torch.no_grad()
def token_nll(
    params: Params,
    ids: np.ndarray | torch.Tensor,
    stride: int | None = None,
    batch_size: int = 32,
    compile: bool = False,
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of ``ids[1:]`` given their prefixes, and the count.

    With ``compile`` the forward and the loss run as one compiled graph, every batch padded to
    ``[batch_size, block_size]`` (padding is not scored) so that one graph serves them all."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    block_size = GPTConfig.from_params(params).block_size
    spans = windows(len(ids), block_size, stride)
    nll_sum = jit(_nll_sum, "the evaluation") if compile else _nll_sum
    total, count = 0.0, 0
    device = params["wte"].device
    for i in range(0, len(spans), batch_size):
        chunk = spans[i : i + batch_size]
        width = max(end - start - 1 for start, end, _ in chunk)
        rows, width = (batch_size, block_size) if compile else (len(chunk), width)
        x = torch.zeros(rows, width, dtype=torch.long)
        y = torch.full_like(x, -1)
        for row, (start, end, first) in enumerate(chunk):
            n = end - start - 1
            x[row, :n] = ids[start : end - 1]
            keep = ids[start + 1 : end].clone()
            keep[: first - start - 1] = -1  # targets scored by an earlier window
            y[row, :n] = keep
        total += float(nll_sum(params, x.to(device), y.to(device)))
        count += int((y >= 0).sum())
    return total, count


def perplexity_report(
    total_nll: float, count: int, n_chars: int | None = None, n_bytes: int | None = None
) -> dict[str, float]:
    """Mean NLL, perplexity and bits per token (and per character / byte when given)."""
    mean = total_nll / count
    report = {
        "mean_nll": mean,
        "perplexity": math.exp(mean),
        "bits_per_token": mean / math.log(2),
        "tokens": count,
    }
    if n_chars:
        report["bits_per_char"] = total_nll / math.log(2) / n_chars
    if n_bytes:
        report["bits_per_byte"] = total_nll / math.log(2) / n_bytes
    return report


def bleu_continuations(
    params: Params,
    tokenizer: Tokenizer,
    text: str,
    samples: int = 50,
    context_chars: int = 200,
) -> dict[str, Any]:
    """Corpus BLEU (sacrebleu) of greedy continuations of held-out lines: each line's first half
    (after up to ``context_chars`` of preceding text) is the prompt, its second half the
    reference."""
    from sacrebleu.metrics import BLEU

    lines = text.splitlines(keepends=True)
    offsets = np.cumsum([0] + [len(line) for line in lines])
    candidates = [i for i, line in enumerate(lines) if len(line.strip()) >= 20]
    if not candidates:
        raise ValueError("no held-out lines of at least 20 characters to continue")
    picked = [
        candidates[int(j)]
        for j in np.linspace(0, len(candidates) - 1, min(samples, len(candidates)))
    ]
    block_size = GPTConfig.from_params(params).block_size
    contexts, refs, budgets = [], [], []
    for i in picked:
        line = lines[i].rstrip("\n")
        half = len(line) // 2
        contexts.append(text[max(0, offsets[i] - context_chars) : offsets[i]] + line[:half])
        refs.append(line[half:])
        budgets.append(min(len(tokenizer.encode(refs[-1])) + 4, block_size // 2))
    new_tokens = max(budgets)  # one batch: every prompt leaves room for the longest budget
    prompts = [tokenizer.encode(c)[-(block_size - new_tokens) :] for c in contexts]
    outputs = generate(params, prompts, new_tokens, temperature=0.0)
    hyps = [tokenizer.decode(out[:b]).split("\n")[0] for out, b in zip(outputs, budgets)]
    metric = BLEU()
    score = metric.corpus_score(hyps, [refs])
    return {
        "bleu": score.score,
        "bleu_signature": str(metric.get_signature()),
        "bleu_samples": len(hyps),
        "example": {"reference": refs[0], "hypothesis": hyps[0]},
    }


def _read_source(
    tokenizer: Tokenizer, data: str | Path | None, text: str | Path | None
) -> tuple[np.ndarray, str, str, list[int]]:
    """``(ids, raw text, source name, leading special ids)`` of prepared ``data`` (its
    validation split) or a ``text`` file; exactly one must be given."""
    if (data is None) == (text is None):
        raise ValueError("give one of data (a prepared directory) or text (a file)")
    lead: list[int] = []
    if text is not None:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"no text file {path}")
        raw = path.read_text(encoding="utf-8")
        lead = tokenizer.leading_ids() if hasattr(tokenizer, "leading_ids") else []
        ids = np.asarray(lead + tokenizer.encode(raw), dtype=np.int64)
        source = str(path)
    else:
        data_dir = Path(data)
        load_meta(data_dir)  # a clear error when it is not prepared data
        theirs = load_tokenizer(data_dir / "tokenizer.json")
        if theirs.to_json() != tokenizer.to_json() and (
            problem := tokenizer_mismatch(theirs, tokenizer)
        ):
            raise ValueError(
                f"{data_dir} was prepared with another tokenizer than the model's: {problem}"
            )
        ids = np.asarray(load_tokens(data_dir, "val"), dtype=np.int64)
        raw = tokenizer.decode(ids.tolist())
        source = f"{data_dir}/val.bin"
    return ids, raw, source, lead


def evaluate(
    params: Params,
    tokenizer: Tokenizer,
    data: str | Path | None = None,
    text: str | Path | None = None,
    stride: int | None = None,
    bleu_samples: int = 0,
    batch_size: int = 32,
    compile: bool = False,
) -> dict[str, Any]:
    """Perplexity of a model on the validation split of prepared ``data`` or on a raw ``text``
    file (encoded as the tokenizer does a document: after Llama's BOS, for instance), plus BLEU
    of ``bleu_samples`` continuations when asked.

    Args:
      params: the model.
      tokenizer: the tokenizer of the model (and of ``data``).
      data: a prepared data directory (its ``val.bin`` is scored).
      text: a text file to score instead.
      stride: sliding windows advancing this many tokens (default: windows do not overlap).
      bleu_samples: continuations scored with BLEU (0: none).
      batch_size: windows per forward.
      compile: score with one compiled graph (``torch.compile``; prints its warm-up time).

    Returns:
      ``source``, ``stride``, mean NLL, perplexity, bits per token / char / byte, tokens...
    """
    ids, raw, source, lead = _read_source(tokenizer, data, text)
    if len(ids) < 2:
        raise ValueError(f"{source} is {len(ids)} token(s) long: nothing to score")
    total, count = token_nll(params, ids, stride, batch_size, compile)
    # bits per char/byte are over the characters whose tokens were scored: all of the text
    # after a leading special token, else all but the first token's
    first = "" if lead else tokenizer.decode(ids[:1].tolist())
    report: dict[str, Any] = {"source": source, "stride": stride or "none"}
    report |= perplexity_report(
        total, count, len(raw) - len(first), len(raw.encode()) - len(first.encode())
    )
    if bleu_samples:
        report |= bleu_continuations(params, tokenizer, raw, bleu_samples)
        report.pop("example")
    return report


def evaluate_run(
    run: str | Path,
    data: str | Path | None = None,
    text: str | Path | None = None,
    stride: int | None = None,
    bleu_samples: int = 0,
    batch_size: int = 32,
    checkpoint: str = "last",
    compile: bool = False,
) -> dict[str, Any]:
    """:func:`evaluate` of a run's model (its ``checkpoint``, "last" or "best") on its own
    validation split (or ``data``'s, or a raw ``text`` file); the report adds the ``step``."""
    params, tokenizer, meta = load_run(run, checkpoint)
    if text is None and data is None:
        data = meta["data_dir"]
    report = evaluate(params, tokenizer, data, text, stride, bleu_samples, batch_size, compile)
    return {"source": report.pop("source"), "step": meta["step"]} | report
