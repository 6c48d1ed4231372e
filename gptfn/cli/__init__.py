"""The ``gptfn`` command: prepare, train, sample, eval, export, plot. Parsing and printing only;
the work is done by the library. One module per command group: ``train`` (train, plot),
``data`` (prepare), ``models`` (sample, eval, export); ``flags`` makes checked flags."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from gptfn.cli.data import cmd_prepare, prepare_args
from gptfn.cli.models import cmd_eval, cmd_export, cmd_sample, eval_args, export_args, sample_args
from gptfn.cli.train import cmd_plot, cmd_train, plot_args, resume_command, train_args

__all__ = ["build_parser", "main"]


COMMANDS = {
    "prepare": ("tokenize text into train.bin / val.bin", prepare_args, cmd_prepare),
    "train": ("train a model (default: built-in corpus, char level)", train_args, cmd_train),
    "sample": ("generate text from a trained run or a pretrained model", sample_args, cmd_sample),
    "eval": ("loss, perplexity (and BLEU) of a run or a pretrained model", eval_args, cmd_eval),
    "export": ("write a run as a Hugging Face model folder", export_args, cmd_export),
    "plot": ("PNG of a run's loss curves", plot_args, cmd_plot),
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
    from gptfn.settings import OptionError
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
                print(f"resume with: {resume_command(argv)}", file=sys.stderr)
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
