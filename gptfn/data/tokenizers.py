"""Tokenizers behind one small interface: ``encode``, ``decode``, ``vocab_size``, JSON save/load.

- ``CharTokenizer``: one id per character seen in the training text.
- ``BPETokenizer``: byte-level BPE trained locally with Hugging Face ``tokenizers``.
- ``GPT2Tokenizer``: GPT-2's BPE through ``tiktoken``; needs its files cached locally (offline it
  fails with a clear message after a short timeout instead of hanging).
- ``HFTokenizer``: any Hugging Face ``tokenizer.json`` (the file in a downloaded GPT-2, Llama,
  Qwen or Pythia folder) through the ``tokenizers`` library, offline.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from gptfn.files import atomic_write_text


@runtime_checkable
class Tokenizer(Protocol):
    """What gptfn needs of a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


class CharTokenizer:
    """Character-level: the sorted set of characters of the training text."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(text)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in this tokenizer's vocabulary"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained on the given text."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        self._tok = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int = 1024) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer": json.loads(self._tok.to_str())}


class GPT2Tokenizer:
    """GPT-2's 50257-token BPE via ``tiktoken`` (its files must be downloadable or cached)."""

    kind = "gpt2"

    def __init__(self, timeout: float = 10.0) -> None:
        try:
            import tiktoken
        except ImportError as err:
            raise RuntimeError("the gpt2 tokenizer needs tiktoken: pip install tiktoken") from err
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)
        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as err:
            cache = os.environ.get("TIKTOKEN_CACHE_DIR", "the tiktoken cache")
            raise RuntimeError(
                "GPT-2 BPE files are not available: tiktoken could not download them and found "
                f"no copy in {cache} ({type(err).__name__}: {err}). Use --tokenizer char or bpe "
                "offline, or put the files in TIKTOKEN_CACHE_DIR."
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
        self.vocab_size = self._enc.n_vocab

    @classmethod
    def train(cls, text: str) -> GPT2Tokenizer:
        return cls()

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind}


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` behind gptfn's interface.

    ``encode`` maps text to ids without special tokens, like gptfn's other tokenizers;
    ``encode(text, add_special_tokens=True)`` applies the file's post-processor (Llama's leading
    BOS, for instance). ``bos_token_id`` / ``eos_token_id`` come from ``tokenizer_config.json``
    beside the file when there is one (else None).
    """

    kind = "hf"

    def __init__(
        self, hf_tokenizer: Any, bos_token: str | None = None, eos_token: str | None = None
    ) -> None:
        self._tok = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = None if bos_token is None else hf_tokenizer.token_to_id(bos_token)
        self.eos_token_id = None if eos_token is None else hf_tokenizer.token_to_id(eos_token)

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Read ``tokenizer.json`` (``path`` is the file or the folder holding it)."""
        from tokenizers import Tokenizer as HFTok

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json at {file}: gptfn reads Hugging Face tokenizers from that "
                "file (folders with only a sentencepiece tokenizer.model are not supported)"
            )
        special = _special_tokens(file.parent / "tokenizer_config.json")
        return cls(HFTok.from_file(str(file)), special.get("bos_token"), special.get("eos_token"))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def leading_ids(self) -> list[int]:
        """The special ids the file's post-processor puts before a text (Llama's BOS; [] for
        GPT-2's): what a model trained on documents expects to see first."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        where = next(i for i in range(len(full) + 1) if full[i : i + len(plain)] == plain)
        return full[:where]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tokenizer": json.loads(self._tok.to_str()),
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }


def _special_tokens(config: Path) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` strings from a tokenizer_config.json (either spelling)."""
    if not config.is_file():
        return {}
    data = json.loads(config.read_text(encoding="utf-8"))
    out = {}
    for key in ("bos_token", "eos_token"):
        value = data.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


PROBE = (
    "Hello, world! The year 1969: 3.14159 + x_1 = y;\n\tindented  two  spaces\n\n"
    'It\'s "quoted" -- ünïcödé, 日本語, 🙂 and\r\nCRLF.  '
)  # ordinary text only: special-token strings are split by some encoders, matched by others


def _ids_or_error(tokenizer: Tokenizer, text: str) -> list[int] | str:
    try:
        return tokenizer.encode(text)
    except Exception as err:  # a char tokenizer meeting an unknown character, say
        return f"cannot encode it ({err})"


def _shown(ids: list[int] | str, other: list[int] | str) -> str:
    """A few ids around the first place ``ids`` differs from ``other``."""
    if isinstance(ids, str):
        return ids
    cut = next((i for i, (x, y) in enumerate(zip(ids, other)) if x != y), min(len(ids), len(other)))
    return f"ids {ids[max(0, cut - 2) : cut + 3]} at token {max(0, cut - 2)}"


def tokenizer_mismatch(ours: Tokenizer, theirs: Tokenizer, texts: list[str] = ()) -> str | None:
    """How two tokenizers differ, in words: their vocabulary sizes, or the ids they give one
    of ``texts`` or a fixed probe (ASCII, digits, whitespace runs, non-Latin script, emoji).
    None when they agree on all of it, so ids made by one mean the same to the other."""
    if ours.vocab_size != theirs.vocab_size:
        return f"a vocabulary of {ours.vocab_size} tokens against {theirs.vocab_size}"
    for text in (PROBE, *texts):
        a, b = _ids_or_error(ours, text), _ids_or_error(theirs, text)
        if a != b:
            return f"{text[:30]!r}... is {_shown(a, b)} against {_shown(b, a)}"
    return None


def tokenizer_json(tokenizer: Tokenizer) -> str | None:
    """The tokenizer as Hugging Face ``tokenizer.json`` text, or None for kinds that have no such
    file (char; tiktoken's gpt2)."""
    data = tokenizer.to_json()
    return json.dumps(data["tokenizer"]) if data.get("kind") in ("bpe", "hf") else None


def tokenizer_from_json(data: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from ``to_json()`` output."""
    kind = data.get("kind")
    if kind == "char":
        return CharTokenizer(data["chars"])
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTok

        return BPETokenizer(HFTok.from_str(json.dumps(data["tokenizer"])))
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "hf":
        from tokenizers import Tokenizer as HFTok

        tok = HFTok.from_str(json.dumps(data["tokenizer"]))
        return HFTokenizer(tok, data.get("bos_token"), data.get("eos_token"))
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected char, bpe, gpt2 or hf)")


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    """Write the tokenizer as JSON (atomically)."""
    atomic_write_text(Path(path), json.dumps(tokenizer.to_json()))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer written by :func:`save_tokenizer`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    return tokenizer_from_json(json.loads(path.read_text()))


def train_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer of ``kind`` ("char", "bpe" or "gpt2") from ``text``."""
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(text, vocab_size or 1024)
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {kind!r}: choose char, bpe or gpt2")
