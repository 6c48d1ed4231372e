"""The ``gptfn`` command: prepare, train, sample, eval, plot. Parsing and printing only; the work
is done by the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _train_flags(parser: argparse.ArgumentParser) -> None:
    from gptfn.train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        if f.name == "resume":
            parser.add_argument(
                "--resume",
                nargs="?",
                const=True,
                default=argparse.SUPPRESS,
                type=lambda v: {"auto": True, "no": False}[v],
                help="[auto]: continue from RUN_DIR/last.safetensors if it exists",
            )
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"(default {default})",
            )
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(
                flag, type=kind, default=argparse.SUPPRESS, help=f"(default {default})"
            )
    parser.add_argument(
        "--config", type=Path, help="TOML file of training options (flags override)"
    )
    parser.add_argument(
        "--sample-tokens",
        type=int,
        default=300,
        help="print a sample of this many tokens after training (0: none)",
    )


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    values = tomllib.loads(path.read_text())
    return {k.replace("-", "_"): v for k, v in values.items()}


def cmd_prepare(args: argparse.Namespace) -> None:
    from gptfn.data import prepare

    meta = prepare(args.input, args.out, args.tokenizer, args.vocab_size, args.val_fraction)
    print(json.dumps(meta, indent=2))


def cmd_train(args: argparse.Namespace) -> None:
    from gptfn.train import TrainConfig, train

    values = _load_toml(args.config) if args.config else {}
    values |= {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "func", "config", "sample_tokens")
    }
    summary = train(TrainConfig.from_dict(values))
    if summary["rank"] != 0:
        return  # under torchrun only rank 0 reports
    last = summary["last"]
    print(
        f"done: {summary['steps']} steps in {summary['seconds']:.0f}s, "
        f"val loss {last.get('val_loss', float('nan')):.4f}, run in {summary['run_dir']}"
    )
    if args.sample_tokens:
        _print_samples(summary["run_dir"], ["\n"], args.sample_tokens, 0.8, None, None, 1, False)


def _print_samples(
    run: str,
    prompts: list[str],
    max_new: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stream: bool,
) -> None:
    from gptfn.checkpoint import load_run
    from gptfn.generation import generate, generate_stream

    params, tok, _ = load_run(run)
    ids = [tok.encode(p) for p in prompts]
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, sliding_window=True)
    if stream:
        for prompt, row in zip(prompts, ids):
            print(prompt, end="", flush=True)
            for (t,) in generate_stream(params, [row], max_new, **kwargs):
                if t is not None:
                    print(tok.decode([t]), end="", flush=True)
            print("\n" + "-" * 40)
        return
    for prompt, new in zip(prompts, generate(params, ids, max_new, **kwargs)):
        print(prompt + tok.decode(new))
        print("-" * 40)


def cmd_sample(args: argparse.Namespace) -> None:
    prompt = args.prompt
    if args.prompt_file:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    prompt = "\n" if prompt is None else prompt
    _print_samples(
        args.run,
        [prompt] * args.num_samples,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        args.stream,
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from gptfn.evaluate import evaluate_run

    report = evaluate_run(
        args.run,
        data=args.data,
        text=args.text,
        stride=args.stride,
        bleu_samples=args.bleu_samples,
        batch_size=args.batch_size,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")


def cmd_plot(args: argparse.Namespace) -> None:
    from gptfn.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptfn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize text into train.bin / val.bin")
    p.add_argument("--input", help="a text file or a directory of them (default: built-in corpus)")
    p.add_argument("--tokenizer", choices=["char", "bpe", "gpt2"], default="char")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 1024)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model (default: built-in corpus, char level)")
    _train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("--run", required=True)
    p.add_argument("--prompt")
    p.add_argument("--prompt-file")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="validation loss, perplexity (and BLEU) of a run")
    p.add_argument("--run", required=True)
    p.add_argument("--data", help="prepared data directory (default: the run's own)")
    p.add_argument("--text", help="a raw text file to score instead")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: no overlap)")
    p.add_argument("--bleu-samples", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plot", help="PNG of a run's loss curves")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gptfn`` command."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError, FloatingPointError) as err:
        print(f"gptfn {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0
