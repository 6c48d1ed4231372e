"""Perplexity and BLEU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gptfn
from gptfn.data import CharTokenizer
from gptfn.evaluate import bleu_continuations, perplexity_report, token_nll, windows


def test_uniform_model_has_perplexity_vocab_size():
    params = gptfn.init(gptfn.GPTConfig(37, 16, 1, 2, 8), seed=0)
    params["wte"] = torch.zeros_like(params["wte"])  # zero unembedding: uniform prediction
    ids = np.random.default_rng(0).integers(0, 37, 200)
    total, count = token_nll(params, ids)
    assert count == 199
    assert perplexity_report(total, count)["perplexity"] == pytest.approx(37, rel=1e-5)


@pytest.mark.parametrize("stride", [None, 1, 5, 16])
def test_windows_score_each_target_once(stride):
    spans = windows(100, 16, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, 100))
    for start, end, first in spans:
        assert end - start - 1 <= 16
        if stride and first > 1:
            assert first - start >= 16 - stride  # at least block_size - stride tokens of context


@pytest.mark.parametrize("stride", [4, 8])
def test_sliding_nll_equals_direct_computation(stride):
    params = gptfn.init(gptfn.GPTConfig(23, 8, 1, 2, 8), seed=1)
    ids = np.random.default_rng(1).integers(0, 23, 30)
    total, count = token_nll(params, ids, stride=stride, batch_size=3)
    direct = 0.0
    for t in range(1, 30):  # target t with the context the sliding window gives it
        window_start = 0
        for start, end, first in windows(30, 8, stride):
            if first <= t < end:
                window_start = start
        ctx = torch.from_numpy(ids[window_start:t])[None]
        logp = gptfn.forward(params, ctx)[0, -1].log_softmax(-1)
        direct -= float(logp[ids[t]])
    assert count == 29 and total == pytest.approx(direct, rel=1e-5)


def test_bleu_of_identical_text_is_100(monkeypatch):
    import gptfn.evaluate as evaluate

    text = "".join(f"line number {i} of the held out text, long enough\n" for i in range(10))
    tok = CharTokenizer.train(text)
    params = gptfn.init(gptfn.GPTConfig(tok.vocab_size, 128, 1, 1, 8), seed=0)

    def oracle(params, prompts, max_new, **kwargs):  # a model that continues perfectly
        outs = []
        for p in prompts:
            prefix = tok.decode(p)
            i = text.index(prefix) + len(prefix)
            outs.append(tok.encode(text[i : i + max_new]))
        return outs

    monkeypatch.setattr(evaluate, "generate", oracle)
    report = bleu_continuations(params, tok, text, samples=5)
    assert report["bleu"] == pytest.approx(100.0)
    assert report["bleu_signature"].startswith("nrefs:1")


def test_bits_per_char_relates_to_nll():
    report = perplexity_report(100 * math.log(2), 100, n_chars=50)
    assert report["bits_per_token"] == pytest.approx(1.0) and report[
        "bits_per_char"
    ] == pytest.approx(2.0)


def test_bleu_prompts_fit_the_context_with_the_longest_budget():
    text = "".join(
        f"{'short' if i % 2 else 'a much longer line of held out text'} {i}\n" for i in range(12)
    )
    tok = CharTokenizer.train(text)
    params = gptfn.init(gptfn.GPTConfig(tok.vocab_size, 24, 1, 1, 8), seed=0)
    report = bleu_continuations(params, tok, text, samples=6, context_chars=200)
    assert report["bleu_samples"] == 6 and 0.0 <= report["bleu"] <= 100.0
