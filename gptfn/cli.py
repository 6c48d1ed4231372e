"""The ``gptfn`` command: prepare, train, sample, eval, export, plot. Parsing and printing only;
the work is done by the library (pretrained models' parts: ``gptfn.cli_models``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptfn.cli_models import (
    add_model_source,
    cmd_export,
    export_args,
    load_model,
    prepare_tokenizer,
    print_samples,
)

__all__ = ["build_parser", "main"]

NAMES = {int: "an integer", float: "a number"}


# ----------------------------------------------------------------------------- checked values


def _number(
    kind: type,
    low: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind`` in the given range, else an error naming what is allowed."""
    bounds = ((">=", low), (">", above), ("<=", at_most), ("<", below))
    allowed = " and ".join(f"{op} {x:g}" for op, x in bounds if x is not None)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected {NAMES[kind]}"
            ) from None
        if (
            (low is not None and value < low)
            or (above is not None and value <= above)
            or (at_most is not None and value > at_most)
            or (below is not None and value >= below)
            or value != value  # NaN
        ):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {allowed}")
        return value

    return parse


def _option_type(cls: type, name: str, kind: type) -> Callable[[str], Any]:
    """An argparse ``type`` for a field of a settings dataclass: the dataclass's own checks."""
    from gptfn.optim import OptionError, check_option

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected {NAMES.get(kind, kind.__name__)}"
            ) from None
        try:
            return check_option(cls, name, value)
        except OptionError as err:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {err.problem}") from None

    return parse


def _resume_value(text: str) -> bool:
    if text not in ("auto", "no"):
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: auto (continue when OUT/last.safetensors exists; also a "
            "bare --resume) or no"
        )
    return text == "auto"


# ----------------------------------------------------------------------------- train's flags


def _train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field, grouped by section, with its help line."""
    import typing

    from gptfn.optim import allowed_values
    from gptfn.train import TrainConfig

    defaults = TrainConfig()  # the default recipe's values
    for section, cls in TrainConfig.SECTIONS.items():
        group = parser.add_argument_group(f"{section} options", cls.__doc__.replace("``", ""))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            text = f.metadata["help"]
            default = getattr(getattr(defaults, section), f.name)
            if f.name == "resume":
                group.add_argument(
                    flag,
                    nargs="?",
                    const=True,
                    type=_resume_value,
                    metavar="auto|no",
                    default=argparse.SUPPRESS,
                    help=text + " (bare --resume: auto)",
                )
            elif bool in (hints[f.name], *typing.get_args(hints[f.name])):
                group.add_argument(
                    flag,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=text if default is None else f"{text} (default: {_on_off(default)})",
                )
            else:
                kind = next(
                    k
                    for k in typing.get_args(hints[f.name]) or [hints[f.name]]
                    if k is not type(None)
                )
                limits = allowed_values(f)
                shown = "" if not limits or f.metadata.get("choices") else f"; {limits}"
                group.add_argument(
                    flag,
                    type=_option_type(cls, f.name, kind),
                    default=argparse.SUPPRESS,
                    choices=f.metadata.get("choices"),
                    help=f"{text} (default: {default}{shown})" if default is not None else text,
                )
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML file of these options; keys are the flag names, at the top level or in "
        "[model], [optimizer], [data], [run] tables; flags override it",
    )


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def cmd_train(args: argparse.Namespace) -> None:
    from gptfn.train import TrainConfig, train

    cfg = TrainConfig()
    if args.config:
        from gptfn.train_config import load_toml

        cfg = TrainConfig.from_dict(load_toml(args.config), source=str(args.config))
    flags = {k: v for k, v in vars(args).items() if TrainConfig.section_of(k) is not None}
    cfg = cfg.replace(**flags)
    summary = train(cfg)
    if summary["rank"] != 0:
        return  # under torchrun only rank 0 reports
    val = summary["last"].get("val_loss")
    print(
        f"done: {summary['steps']} steps in {summary['seconds']:.0f}s, "
        + (f"val loss {val:.4f}, " if val is not None else "")
        + f"run in {summary['run_dir']}"
    )
    if cfg.run.sample_tokens:
        from gptfn.checkpoint import load_run

        params, tokenizer, _ = load_run(summary["run_dir"], "last")
        print_samples(
            params,
            tokenizer,
            ["\n"],
            cfg.run.sample_tokens,
            dict(temperature=0.8, seed=1),
            False,
        )


def _resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same flags, --resume instead of
    --overwrite."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--overwrite", "--no-overwrite", "--no-resume") or arg.startswith("--resume="):
            continue
        if arg == "--resume":
            skip = i + 1 < len(argv) and argv[i + 1] in ("auto", "no")
            continue
        kept.append(arg)
    return shlex.join(["gptfn", *kept, "--resume"])


# ----------------------------------------------------------------------------- the others


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


def cmd_sample(args: argparse.Namespace) -> None:
    prompt = args.prompt
    if args.prompt_file:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    prompt = "\n" if prompt is None else prompt
    if not prompt:
        raise ValueError("the prompt is empty: give at least one character")
    sampling = dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    ) | {"compile": args.compile}
    params, tokenizer, _ = load_model(args)
    print_samples(
        params,
        tokenizer,
        [prompt] * args.num_samples,
        args.max_new_tokens,
        sampling,
        args.stream,
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from gptfn.evaluate import evaluate, evaluate_run

    options = dict(
        data=args.data,
        text=args.text,
        stride=args.stride,
        bleu_samples=args.bleu_samples,
        batch_size=args.batch_size,
        compile=args.compile,
    )
    if args.model is None:
        report = evaluate_run(args.run, checkpoint=args.checkpoint or "last", **options)
    elif args.data is None and args.text is None:
        raise ValueError("--model needs --text FILE (or --data DIR, prepared with its tokenizer)")
    else:
        params, tokenizer, _ = load_model(args)
        report = {"model": args.model} | evaluate(params, tokenizer, **options)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")


def cmd_plot(args: argparse.Namespace) -> None:
    from gptfn.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")


POSITIVE, COUNT = _number(int, low=1), _number(int, low=0)


def _prepare_args(p: argparse.ArgumentParser) -> None:
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
        "--vocab-size", type=_number(int, low=2), help="BPE vocabulary size (default 1024)"
    )
    p.add_argument(
        "--val-fraction",
        type=_number(float, above=0, below=1),
        default=0.1,
        help="share of the text held out for validation (default 0.1)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace prepared data in --out")


def _sample_args(p: argparse.ArgumentParser) -> None:
    add_model_source(p)
    p.add_argument("--prompt", help="text to continue (default: a newline)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--num-samples", type=POSITIVE, default=1, help="continuations (default 1)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=300, help="(default 300)")
    p.add_argument(
        "--temperature", type=_number(float, low=0), default=0.8, help="0: greedy (default 0.8)"
    )
    p.add_argument("--top-k", type=POSITIVE, help="sample from the k likeliest tokens")
    p.add_argument(
        "--top-p",
        type=_number(float, above=0, at_most=1),
        help="sample from the smallest set of tokens with this much probability",
    )
    p.add_argument("--seed", type=COUNT, help="same seed, same samples")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the prefill and decode steps (same text; compiling takes a while)",
    )


def _eval_args(p: argparse.ArgumentParser) -> None:
    add_model_source(p)
    p.add_argument("--data", help="prepared data directory (default: the run's own)")
    p.add_argument("--text", help="a raw text file to score instead (with --model: or --data)")
    p.add_argument("--stride", type=POSITIVE, help="sliding-window stride (default: no overlap)")
    p.add_argument("--bleu-samples", type=COUNT, default=0, help="BLEU of this many continuations")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="(default 32)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--compile", action="store_true", help="score with one torch.compile'd graph")


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")


COMMANDS = {
    "prepare": ("tokenize text into train.bin / val.bin", _prepare_args, cmd_prepare),
    "train": ("train a model (default: built-in corpus, char level)", _train_flags, cmd_train),
    "sample": ("generate text from a trained run or a pretrained model", _sample_args, cmd_sample),
    "eval": ("loss, perplexity (and BLEU) of a run or a pretrained model", _eval_args, cmd_eval),
    "export": ("write a run as a Hugging Face model folder", export_args, cmd_export),
    "plot": ("PNG of a run's loss curves", _plot_args, cmd_plot),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``gptfn`` argument parser (every value checked as it is parsed)."""
    parser = argparse.ArgumentParser(prog="gptfn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        add_arguments(p)
        p.set_defaults(func=run)
    return parser


def _show_warning(message: Warning | str, category: type, *args: Any, **kwargs: Any) -> None:
    print(f"gptfn: warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gptfn`` command; returns the exit status (128 + the signal number
    when training was interrupted)."""
    from gptfn.optim import OptionError
    from gptfn.train import TrainingInterrupted

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    name = f"gptfn {args.command}"
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            args.func(args)
        except TrainingInterrupted as err:
            print(f"{name}: {err}", file=sys.stderr)
            if err.checkpoint is not None:
                print(f"resume with: {_resume_command(argv)}", file=sys.stderr)
            return 128 + err.signum
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr)
            return 130
        except OptionError as err:
            flag = "--" + err.name.replace("_", "-") if " " not in err.name else err.name
            print(
                f"{name}: error: {flag}: invalid value {err.value!r}: {err.problem}",
                file=sys.stderr,
            )
            return 1
        except (OSError, ValueError, RuntimeError, FloatingPointError) as err:
            print(f"{name}: error: {err}", file=sys.stderr)
            return 1
    return 0
