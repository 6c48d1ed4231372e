"""Requests per second of gptfn's lm-eval model (``gptfn.lm_eval.GPTFNLM``) against lm-eval's own
``HFLM`` on the same random GPT-2-shaped model, interleaved in one process.

Both score the same requests, built from the built-in corpus: multiple-choice style
log-likelihoods (4 continuations per context), rolling log-likelihoods of whole passages
(several windows each), and greedy generations with a stop string. The tokenizer is a BPE trained
on the corpus (offline). Each row: the median of ``--repeats`` timings, A then B then A ...,
after an untimed warm-up of each.

    python experiments/bench_lm_eval.py [--repeats 3] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

import gptfn
from gptfn.lm_eval import GPTFNLM


def tokenizer(text: str, vocab: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab`` tokens trained on ``text``, with <|endoftext|> as BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    eot = "<|endoftext|>"
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, pad_token=eot
    )


def requests(text: str, n: int, seed: int = 0) -> dict[str, list[Instance]]:
    """``n`` requests of each kind from random places in ``text``."""
    rng = random.Random(seed)
    words = text.split()

    def span(k: int) -> str:
        start = rng.randrange(len(words) - k)
        return " ".join(words[start : start + k])

    mc = []
    for i in range(n // 4):
        context = span(rng.randint(10, 60))
        mc += [Instance("loglikelihood", {}, (context, " " + span(rng.randint(1, 6))), 4 * i + j)
               for j in range(4)]  # fmt: skip
    rolling = [Instance("loglikelihood_rolling", {}, (span(rng.randint(100, 400)),), i)
               for i in range(n // 4)]  # fmt: skip
    greedy = {"until": ["\n\n", "."], "max_gen_toks": 32, "do_sample": False}
    gen = [Instance("generate_until", {}, (span(rng.randint(10, 60)), greedy), i)
           for i in range(n // 4)]  # fmt: skip
    return {"loglikelihood": mc, "loglikelihood_rolling": rolling, "generate_until": gen}


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="per kind, times 4 for ll")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = gptfn.data.shakespeare()
    tok = tokenizer(text, 2048)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=256, n_layer=4, n_head=4,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        params = gptfn.load_pretrained(folder)
    models = {
        "gptfn": GPTFNLM(params, tok, batch_size=args.batch_size),
        "HFLM": HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device="cpu"),
    }
    kinds = requests(text, args.requests)
    rows = []
    for kind, reqs in kinds.items():
        times: dict[str, list[float]] = {name: [] for name in models}
        for lm in models.values():  # warm-up, untimed
            getattr(lm, kind)(reqs[:2], disable_tqdm=True)
        for _ in range(args.repeats):
            for name, lm in models.items():  # interleaved: drift hits both alike
                times[name].append(timed(lambda: getattr(lm, kind)(reqs, disable_tqdm=True)))
        rate = {name: len(reqs) / statistics.median(t) for name, t in times.items()}
        rows.append((kind, len(reqs), rate["gptfn"], rate["HFLM"]))
    setup = f"batch {args.batch_size}, {args.threads} threads, median of {args.repeats}"
    print(f"model: GPT-2 shape, 4 layers, d=256, vocab {len(tok)}, block 256; {setup}\n")
    print("| request type | requests | gptfn req/s | HFLM req/s | gptfn / HFLM |")
    print("|---|---:|---:|---:|---:|")
    for kind, n, ours, theirs in rows:
        print(f"| {kind} | {n} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
