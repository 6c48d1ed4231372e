"""``gptfn train`` (its flags generated from the run's option sections) and ``gptfn plot``."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from gptfn.cli.flags import add_dataclass_flags
from gptfn.cli.models import print_samples


def _resume_value(text: str) -> bool:
    if text not in ("auto", "no"):
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: auto (continue when OUT/last.safetensors exists; also a "
            "bare --resume) or no"
        )
    return text == "auto"


def train_args(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field, grouped by section, with its help line."""
    from gptfn.train import TrainConfig

    defaults = TrainConfig()  # the default recipe's values
    for section, cls in TrainConfig.SECTIONS.items():
        group = parser.add_argument_group(f"{section} options", cls.__doc__.replace("``", ""))
        add_dataclass_flags(group, cls, getattr(defaults, section), {"resume": _resume_flag})
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML file of these options; keys are the flag names, at the top level or in "
        "[model], [optimizer], [data], [run] tables; flags override it",
    )


def _resume_flag(group: argparse._ArgumentGroup, flag: str, text: str) -> None:
    group.add_argument(
        flag,
        nargs="?",
        const=True,
        type=_resume_value,
        metavar="auto|no",
        default=argparse.SUPPRESS,
        help=text + " (bare --resume: auto)",
    )


def cmd_train(args: argparse.Namespace) -> None:
    from gptfn.train import TrainConfig, train

    cfg = TrainConfig()
    if args.config:
        from gptfn.train.options import load_toml

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


def resume_command(argv: list[str]) -> str:
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


def plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")


def cmd_plot(args: argparse.Namespace) -> None:
    from gptfn.train.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
