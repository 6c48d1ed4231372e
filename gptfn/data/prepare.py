"""``prepare``: text in, ``train.bin`` / ``val.bin`` token files plus tokenizer and meta out.

Token files are flat little-endian uint16 arrays (uint32 when the vocabulary needs it), written
and read back (``np.memmap``) as little-endian whatever the machine. The validation split is the
last ``val_fraction`` of the text. Every file is written atomically, and a folder that already
holds prepared data is replaced only when asked (``overwrite``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gptfn.data.corpus import shakespeare
from gptfn.data.tokenizers import Tokenizer, save_tokenizer, train_tokenizer
from gptfn.files import atomic_write, atomic_write_text, remove_stale_temps

TEXT_SUFFIXES = (".txt", ".md", ".text", "")
DATA_FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")


def read_text(source: str | Path | None) -> str:
    """The text of a file, of every text file under a directory (sorted), or (None) the corpus."""
    if source is None:
        return shakespeare()
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no text files (.txt, .md) under {path}")
        return "\n".join(p.read_text(encoding="utf-8") for p in files)
    raise FileNotFoundError(f"input {path} does not exist")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _write_tokens(path: Path, ids: list[int], dtype: np.dtype) -> None:
    array = np.asarray(ids, dtype=dtype.newbyteorder("<"))
    atomic_write(path, lambda tmp: array.tofile(tmp))


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace prepared data unless ``overwrite``; remove stale temporary files."""
    found = [name for name in DATA_FILES if (out / name).is_file()]
    if found and not overwrite:
        raise FileExistsError(
            f"{out} already holds prepared data ({', '.join(found)}). Replace it with "
            "--overwrite, or choose another --out."
        )
    remove_stale_temps(out, DATA_FILES)


def prepare(
    source: str | Path | None,
    out_dir: str | Path,
    tokenizer: str | Tokenizer = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize ``source`` into ``out_dir``; returns the meta dict.

    Args:
      source: a text file, a folder of them, or None for the built-in corpus (:func:`read_text`).
      out_dir: where ``train.bin``, ``val.bin``, ``tokenizer.json`` and ``meta.json`` go.
      tokenizer: ``"char"``, ``"bpe"`` or ``"gpt2"`` (trained or fetched here), or a ready
        tokenizer, such as a pretrained model's
        (``gptfn.pretrained.load_pretrained_tokenizer``), to fine-tune that model on the data.
      vocab_size: the BPE vocabulary size (default 1024).
      val_fraction: the share of the text, from its end, held out for validation.
      overwrite: replace prepared data already in ``out_dir`` (otherwise an error).

    Returns:
      The meta dict written to ``meta.json`` (vocabulary size, token counts, dtype ...).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    _check_out(out, overwrite)
    text = read_text(source)
    if len(text) < 100:
        raise ValueError(f"input has only {len(text)} characters: too little to train on")
    cut = int(len(text) * (1 - val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    if isinstance(tokenizer, str):
        tok = train_tokenizer(tokenizer, text if tokenizer == "char" else train_text, vocab_size)
    else:
        tok = tokenizer
    dtype = token_dtype(tok.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)
    _write_tokens(out / "train.bin", train_ids, dtype)
    _write_tokens(out / "val.bin", val_ids, dtype)
    save_tokenizer(tok, out / "tokenizer.json")
    meta = {
        "tokenizer": tok.to_json()["kind"],
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "val_characters": len(val_text),
        "source": "built-in shakespeare" if source is None else str(source),
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))
    return meta


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """Read ``meta.json`` of a prepared data directory, with a clear error when it is missing."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{data_dir} is not a prepared data directory (no meta.json); run `gptfn prepare` first"
        )
    return json.loads(path.read_text())
