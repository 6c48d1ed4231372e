"""Tokenizers, the corpus, prepare and batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptfn.data import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    load_tokenizer,
    load_tokens,
    prepare,
    random_batch,
    save_tokenizer,
    sequential_batches,
)
from gptfn.data.corpus import markdown_to_text, play_names

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


@pytest.mark.parametrize("tokenizer", [CharTokenizer.train(TEXT), BPETokenizer.train(TEXT, 300)])
def test_tokenizer_round_trip_and_json(tokenizer, tmp_path):
    ids = tokenizer.encode(TEXT[:200])
    assert tokenizer.decode(ids) == TEXT[:200]
    assert max(ids) < tokenizer.vocab_size
    save_tokenizer(tokenizer, tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert again.encode(TEXT[:200]) == ids and again.vocab_size == tokenizer.vocab_size


def test_char_tokenizer_rejects_unknown_characters():
    with pytest.raises(ValueError, match="'~' is not in"):
        CharTokenizer.train("abc").encode("a~")


def test_gpt2_tokenizer_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    try:
        tok = GPT2Tokenizer(timeout=5)
    except RuntimeError as err:
        assert "GPT-2 BPE files are not available" in str(err)
    else:  # the files were reachable after all: then it must work
        assert tok.decode(tok.encode("Hello world")) == "Hello world"


def test_corpus_markdown_conversion():
    md = (
        "# Play\n\n## ACT I\n\n_Enter two_\n\n**FIRST**  \nHello there,  \nfriend.\n\n"
        "**SECOND**  \nHi.\n"
    )
    assert markdown_to_text(md) == "FIRST:\nHello there,\nfriend.\n\nSECOND:\nHi.\n"
    assert len(play_names()) == 38


def test_prepare_writes_splits_atomically(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text(TEXT)
    meta = prepare(src, tmp_path / "out", "char", val_fraction=0.25)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]
    assert json.loads((out / "meta.json").read_text()) == meta and meta["dtype"] == "uint16"
    tok = load_tokenizer(out / "tokenizer.json")
    cut = int(len(TEXT) * 0.75)
    assert tok.decode(load_tokens(out, "val").tolist()) == TEXT[cut:]  # the LAST fraction
    assert tok.decode(load_tokens(out, "train").tolist()) == TEXT[:cut]


def test_prepare_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(tmp_path / "missing.txt", tmp_path / "o")
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(None, tmp_path / "o", val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="gptfn prepare"):
        load_tokens(tmp_path, "train")


def test_random_batch_is_a_function_of_seed_and_step():
    data = np.arange(1000, dtype=np.uint16)
    x, y = random_batch(data, 4, 16, seed=1, step=7)
    x2, _ = random_batch(data, 4, 16, seed=1, step=7)
    x3, _ = random_batch(data, 4, 16, seed=1, step=8)
    assert (x == x2).all() and not (x == x3).all()
    assert (y[:, :-1] == x[:, 1:]).all() and (y == x + 1).all()


def test_sequential_batches_score_every_target_once():
    data = np.arange(103, dtype=np.uint16)
    targets = [
        t for _, y in sequential_batches(data, 3, 10) for t in y.flatten().tolist() if t >= 0
    ]
    assert targets == list(range(1, 103))
