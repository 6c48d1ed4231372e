"""``gptfn sample``, ``eval`` and ``export``: which model they read (a run, or a Hugging Face
folder or cached id), how samples print, a run as a Hugging Face folder, and ``prepare
--tokenizer`` with a pretrained model's tokenizer. Parsing and printing only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gptfn.cli.flags import COUNT, POSITIVE, number

TOKENIZER_KINDS = ("char", "bpe", "gpt2")
DTYPES = ("float32", "bfloat16", "float16", "stored")


def add_model_source(p: argparse.ArgumentParser) -> None:
    """``--run RUN_DIR [--checkpoint last|best]`` or ``--model PATH_OR_ID``: exactly one."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory (a model trained by gptfn train)")
    source.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        help="a pretrained model: a Hugging Face folder (config.json, safetensors, "
        "tokenizer.json) or a model id in the local Hugging Face cache",
    )
    p.add_argument(
        "--checkpoint",
        choices=["last", "best"],
        help="which checkpoint of the --run (default: last)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="the weights' dtype in memory: a --model is converted tensor by tensor as it is "
        "read, so bfloat16 never holds a float32 copy; 'stored' keeps the folder's (default: "
        "float32)",
    )


def load_model(args: argparse.Namespace) -> tuple[Any, Any, dict | None]:
    """``(params, tokenizer, meta)`` of ``--run`` (meta: the checkpoint's) or ``--model``
    (meta: None)."""
    import torch

    dtype = None if args.dtype == "stored" else getattr(torch, args.dtype)
    if args.model is None:
        from gptfn.checkpoint import load_run
        from gptfn.tree import cast

        params, tokenizer, meta = load_run(args.run, args.checkpoint or "last")
        return (params if dtype is None else cast(params, dtype)), tokenizer, meta
    if args.checkpoint is not None:
        raise ValueError("--checkpoint chooses a checkpoint of a --run; --model has none")
    from gptfn.pretrained import load_pretrained, load_pretrained_tokenizer

    params = load_pretrained(args.model, dtype=dtype)
    return params, load_pretrained_tokenizer(args.model), None


def print_samples(
    params: Any, tok: Any, prompts: list[str], max_new: int, sampling: dict, stream: bool
) -> None:
    """Generate one continuation per prompt in one batch (each prompt after the tokenizer's
    leading special ids, e.g. Llama's BOS; a row stops at its EOS); with ``stream`` print the
    first as its tokens come and the others when done (the same text as without ``stream``)."""
    from gptfn.generation import generate, generate_stream

    lead = tok.leading_ids() if hasattr(tok, "leading_ids") else []
    ids = [lead + tok.encode(p) for p in prompts]
    kwargs = dict(sampling, roll_context=True, eos_token_id=getattr(tok, "eos_token_id", None))
    if not stream:
        outputs = generate(params, ids, max_new, **kwargs)
    else:
        outputs, shown = [[] for _ in prompts], ""
        print(prompts[0], end="", flush=True)
        for step in generate_stream(params, ids, max_new, **kwargs):
            for row, t in zip(outputs, step):
                if t is not None:
                    row.append(t)
            text = tok.decode(outputs[0])  # whole: a token alone may be part of a character
            if step[0] is not None and not text.endswith("\ufffd"):
                print(text[len(shown) :], end="", flush=True)
                shown = text
        print(tok.decode(outputs[0])[len(shown) :] + "\n" + "-" * 40)
    for i, (prompt, new) in enumerate(zip(prompts, outputs)):
        if not (stream and i == 0):
            print(prompt + tok.decode(new))
            print("-" * 40)


# ----------------------------------------------------------------------------- export


def export_args(p: argparse.ArgumentParser) -> None:
    from gptfn.families import FAMILIES

    p.add_argument("--run", required=True, help="run directory")
    p.add_argument(
        "--checkpoint",
        choices=["last", "best"],
        default="last",
        help="which checkpoint of the run (default: last)",
    )
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--hf", metavar="OUT_DIR", help="write a Hugging Face model folder")
    out.add_argument(
        "--peft", metavar="OUT_DIR", help="write a LoRA run's adapters as a PEFT adapter folder"
    )
    out.add_argument(
        "--safetensors",
        metavar="FILE",
        help="write one gptfn checkpoint file (consolidates an --fsdp run's DCP folder)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="with --hf, for a LoRA run: write the base model with the adapters merged in",
    )
    p.add_argument(
        "--model-type",
        choices=sorted(FAMILIES),
        help="the Hugging Face family (default: the first that can express the model)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES[:3],
        help="write the model's weights in this dtype (default: as trained, float32)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")


def cmd_export(args: argparse.Namespace) -> None:
    """Write a run's checkpoint as a folder ``AutoModelForCausalLM.from_pretrained`` loads, or a
    LoRA run's adapters as a folder ``peft.PeftModel.from_pretrained`` loads."""
    from gptfn.checkpoint import load_run_parts
    from gptfn.lora import merge, save_peft

    if args.safetensors:
        return _export_checkpoint(args)
    out = Path(args.hf or args.peft)
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    base, trained, tokenizer, meta = load_run_parts(args.run, args.checkpoint)
    if base is None and (args.peft or args.merge):
        raise ValueError(
            f"{args.run} trained every weight (no LoRA adapters): export it with --hf alone"
        )
    if args.peft:
        save_peft(trained, out, base, model_type=args.model_type)
        print(f"wrote {out} (PEFT LoRA adapter for {meta['lora']['base']}, step {meta['step']})")
        return
    if base is not None and not args.merge:
        raise ValueError(
            f"{args.run} holds LoRA adapters on {meta['lora']['base']}: write them with --peft "
            "DIR, or base + adapters as one model with --hf DIR --merge"
        )
    _export_hf(out, trained if base is None else merge(base, trained), tokenizer, meta, args)


def _export_hf(
    out: Path, params: Any, tokenizer: Any, meta: dict, args: argparse.Namespace
) -> None:
    import torch

    from gptfn.data.tokenizers import tokenizer_json
    from gptfn.pretrained import save_pretrained
    from gptfn.tree import cast

    if args.dtype is not None:
        params = cast(params, getattr(torch, args.dtype))
    has_file = tokenizer_json(tokenizer) is not None
    save_pretrained(
        params,
        out,
        tokenizer if has_file else None,
        model_type=args.model_type,
        overwrite=args.overwrite,
    )
    kind = tokenizer.to_json().get("kind")
    print(
        f"wrote {out} (model_type {_model_type(out)}, step {meta['step']}"
        + (", with tokenizer.json)" if has_file else f"; a {kind} tokenizer has no tokenizer.json)")
    )


def _export_checkpoint(args: argparse.Namespace) -> None:
    """``export --safetensors``: the run's checkpoint (a DCP folder consolidated) as one file."""
    import shutil

    from gptfn.checkpoint import consolidate, latest_checkpoint, read_meta

    out, source = Path(args.safetensors), latest_checkpoint(args.run, args.checkpoint)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if source.is_dir():
        meta = consolidate(source, out)
    else:
        shutil.copyfile(source, out)
        meta = read_meta(out)
    print(f"wrote {out} (step {meta['step']}, from {source})")


def _model_type(folder: Path) -> str:
    import json

    return json.loads((folder / "config.json").read_text(encoding="utf-8"))["model_type"]


# ----------------------------------------------------------------------------- prepare


def prepare_tokenizer(value: str) -> Any:
    """``prepare --tokenizer``: a kind to train (char, bpe, gpt2) as is, else a pretrained
    model's ``tokenizer.json`` (a folder, the file itself, or a cached model id)."""
    if value in TOKENIZER_KINDS:
        return value
    from gptfn.data.tokenizers import HFTokenizer
    from gptfn.pretrained import load_pretrained_tokenizer

    try:
        if Path(value).is_file():
            return HFTokenizer.from_file(value)
        return load_pretrained_tokenizer(value)
    except (FileNotFoundError, RuntimeError) as err:
        raise ValueError(
            f"--tokenizer {value!r}: not one of {', '.join(TOKENIZER_KINDS)}, and no pretrained "
            f"tokenizer there ({err})"
        ) from None


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

    if args.tasks is not None:
        return _eval_tasks(args)

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


def _eval_tasks(args: argparse.Namespace) -> None:
    """``gptfn eval --tasks``: lm-evaluation-harness tasks on the model in memory; prints the
    harness's table and writes its JSON (beside a --run, or at --output)."""
    try:
        from gptfn.lm_eval import evaluate_tasks, format_table
    except ImportError as err:
        raise ValueError(f"--tasks needs lm-eval: {err}") from None
    options = dict(
        include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
    )  # fmt: skip
    if args.model is not None:  # lm-eval reads the folder's tokenizer as HFLM would
        dtype = None if args.dtype == "stored" else args.dtype
        results = evaluate_tasks(args.model, None, args.tasks, dtype=dtype, **options)
    else:
        params, tokenizer, _ = load_model(args)
        results = evaluate_tasks(params, tokenizer, args.tasks, **options)
    print(format_table(results))
    out = args.output or (None if args.run is None else _results_path(Path(args.run), args.tasks))
    if out is not None:
        from gptfn.files import atomic_write_text

        atomic_write_text(Path(out), json.dumps(results, indent=2, default=str))
        print(f"wrote {out}")


def _results_path(run_dir: Path, tasks: str) -> Path:
    """``RUN/lm_eval/<tasks>-<time>.json``: a new file each time, never over another."""
    import time

    name = "_".join(t.strip() for t in tasks.split(",") if t.strip())[:80]
    return run_dir / "lm_eval" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def sample_args(p: argparse.ArgumentParser) -> None:
    add_model_source(p)
    p.add_argument("--prompt", help="text to continue (default: a newline)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--num-samples", type=POSITIVE, default=1, help="continuations (default 1)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=300, help="(default 300)")
    p.add_argument(
        "--temperature", type=number(float, low=0), default=0.8, help="0: greedy (default 0.8)"
    )
    p.add_argument("--top-k", type=POSITIVE, help="sample from the k likeliest tokens")
    p.add_argument(
        "--top-p",
        type=number(float, above=0, at_most=1),
        help="sample from the smallest set of tokens with this much probability",
    )
    p.add_argument("--seed", type=COUNT, help="same seed, same samples")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the prefill and decode steps (same text; compiling takes a while)",
    )


def eval_args(p: argparse.ArgumentParser) -> None:
    add_model_source(p)
    p.add_argument("--data", help="prepared data directory (default: the run's own)")
    p.add_argument("--text", help="a raw text file to score instead (with --model: or --data)")
    p.add_argument("--stride", type=POSITIVE, help="sliding-window stride (default: no overlap)")
    p.add_argument("--bleu-samples", type=COUNT, default=0, help="BLEU of this many continuations")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="(default 32)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--compile", action="store_true", help="score with one torch.compile'd graph")
    tasks = p.add_argument_group(
        "lm-evaluation-harness (pip install 'gptfn[eval]')",
        "score the model on the harness's tasks instead, in memory (no conversion)",
    )
    tasks.add_argument("--tasks", help="task, group or tag names, comma-separated")
    tasks.add_argument("--include-path", help="a folder of your own task YAML files")
    tasks.add_argument("--limit", type=POSITIVE, help="documents per task (default: all)")
    tasks.add_argument("--num-fewshot", type=COUNT, help="few-shot examples (default: the task's)")
    tasks.add_argument(
        "--output", help="the results JSON (default with --run: RUN/lm_eval/TASKS-TIME.json)"
    )
