"""Data: tokenizers, the built-in corpus, ``prepare`` and batch samplers."""

from gptfn.data.batches import Prefetcher, load_tokens, random_batch, sequential_batches
from gptfn.data.corpus import shakespeare
from gptfn.data.prepare import load_meta, prepare, read_text
from gptfn.data.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_json,
    train_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "CharTokenizer",
    "GPT2Tokenizer",
    "Prefetcher",
    "Tokenizer",
    "load_meta",
    "load_tokenizer",
    "load_tokens",
    "prepare",
    "random_batch",
    "read_text",
    "save_tokenizer",
    "sequential_batches",
    "shakespeare",
    "tokenizer_from_json",
    "train_tokenizer",
]
