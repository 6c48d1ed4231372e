"""``gptfn prepare``: text to token files."""

from __future__ import annotations

import argparse
import json

from gptfn.cli.flags import number
from gptfn.cli.models import prepare_tokenizer


def cmd_prepare(args: argparse.Namespace) -> None:
    from gptfn.data import prepare

    meta = prepare(
        args.input,
        args.out,
        prepare_tokenizer(args.tokenizer),
        args.vocab_size,
        args.val_fraction,
        overwrite=args.overwrite,
    )
    print(json.dumps(meta, indent=2))


def prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", help="a text file or a directory of them (default: built-in corpus)")
    p.add_argument(
        "--tokenizer",
        default="char",
        metavar="char|bpe|gpt2|PATH_OR_ID",
        help="char, bpe (trained on the text), gpt2 (tiktoken), or a pretrained model's "
        "tokenizer.json (its folder, the file, or a cached model id) to fine-tune that model "
        "(default: char)",
    )
    p.add_argument(
        "--vocab-size", type=number(int, low=2), help="BPE vocabulary size (default 1024)"
    )
    p.add_argument(
        "--val-fraction",
        type=number(float, above=0, below=1),
        default=0.1,
        help="share of the text held out for validation (default 0.1)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace prepared data in --out")
