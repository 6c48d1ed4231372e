"""Fine-tuning: a run that starts from a pretrained model (``init_from``) instead of random weights.

The pretrained folder decides the architecture: an architecture option the user gave that says
otherwise is an error, the ones left unset take the model's values (so the run's recorded
options tell the truth), and ``block_size`` becomes the length of the training sequences (at
most the model's context; by default all of it). The prepared data must have been tokenized
with the model's own tokenizer (``gptfn prepare --tokenizer MODEL``): ids from another
tokenizer would mean other words to the model, a silent wrong result.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptfn import lora
from gptfn.data import load_meta, load_tokenizer, load_tokens
from gptfn.data.tokenizers import Tokenizer, tokenizer_mismatch
from gptfn.model import GPTConfig, loss
from gptfn.pretrained import load_pretrained, load_pretrained_tokenizer
from gptfn.settings import OptionError
from gptfn.shapes import Params
from gptfn.train.options import ARCHITECTURE, TrainConfig, lora_targets, recipe_section

SAMPLE_TOKENS = 2048  # of each split, decoded and tokenized again by the model's tokenizer


def pretrained_start(cfg: TrainConfig, device: torch.device | str) -> tuple[Params, TrainConfig]:
    """The pretrained params of ``cfg.model.init_from`` (float32, on ``device``) and ``cfg``
    with the model's architecture, after checking the data's tokenizer and the user's options
    against it."""
    source = cfg.model.init_from
    if cfg.data.data is None:
        raise OptionError(
            "init_from",
            source,
            "needs --data: text prepared with the model's tokenizer "
            f"(gptfn prepare --input TEXT --tokenizer {source} --out DIR)",
        )
    data_dir = Path(cfg.data.data)
    load_meta(data_dir)  # a clear error when it is not prepared data
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    params = load_pretrained(source, dtype=torch.float32, device=device)
    check_data_tokenizer(source, tokenizer, data_dir, GPTConfig.from_params(params).vocab_size)
    return params, with_pretrained_architecture(cfg, GPTConfig.from_params(params))


def check_data_tokenizer(
    source: str | Path, tokenizer: Tokenizer, data_dir: Path, vocab_size: int
) -> None:
    """Raise ``ValueError`` unless the data in ``data_dir`` (tokenized by ``tokenizer``) was
    tokenized as the model ``source``'s own ``tokenizer.json`` does: the same vocabulary and
    the same ids for a probe text and for samples of the data's own text."""
    try:
        theirs = load_pretrained_tokenizer(source)
    except FileNotFoundError as err:
        raise ValueError(
            f"cannot check that the data in {data_dir} was tokenized as {source} expects: {err}"
        ) from None
    samples = [
        tokenizer.decode(np.asarray(load_tokens(data_dir, split)[:SAMPLE_TOKENS]).tolist())
        for split in ("train", "val")
    ]
    problem = tokenizer_mismatch(tokenizer, theirs, samples)
    if problem is None and tokenizer.vocab_size > vocab_size:
        problem = f"its {tokenizer.vocab_size} tokens do not fit the model's {vocab_size} rows"
    if problem is not None:
        kind = tokenizer.to_json().get("kind")
        raise ValueError(
            f"the data in {data_dir} was tokenized with another tokenizer ({kind}) than the "
            f"model {source}'s tokenizer.json: {problem}. Prepare the text with the model's "
            f"tokenizer: gptfn prepare --input TEXT --tokenizer {source} --out DIR"
        )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def with_pretrained_architecture(cfg: TrainConfig, model: GPTConfig) -> TrainConfig:
    """``cfg`` with every architecture option set to ``model``'s; ``block_size`` is the
    training sequence length (given: at most the model's context; else the model's context).

    Raises:
      ValueError: naming each option given (by name, or a value other than its default)
        that contradicts the model, with the model's value.
    """
    defaults = recipe_section("model", cfg.run.recipe)  # what the user did not choose
    theirs = {name: getattr(model, name) for name in ARCHITECTURE}
    given = {
        name
        for name in theirs
        if name in cfg.given or getattr(cfg.model, name) != getattr(defaults, name)
    }
    wrong = [
        f"{_flag(name)} {getattr(cfg.model, name)} (the model: {value})"
        for name, value in theirs.items()
        if name in given and getattr(cfg.model, name) != value and name != "block_size"
    ]
    if "block_size" in given and cfg.model.block_size > model.block_size:
        wrong.append(
            f"--block-size {cfg.model.block_size} (the model's context is {model.block_size};"
            " fine-tuning sequences may be shorter, not longer)"
        )
    if wrong:
        raise ValueError(
            f"--init-from {cfg.model.init_from}: options that contradict the pretrained model: "
            f"{', '.join(wrong)}. Leave them out: fine-tuning keeps the model's architecture"
        )
    theirs["block_size"] = cfg.model.block_size if "block_size" in given else model.block_size
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **theirs))


def lora_start(cfg: TrainConfig, params: Params) -> tuple[Params | None, Params, Callable]:
    """``(base, trained, loss_fn)``: with ``--lora-rank`` the frozen ``params``, fresh adapters
    (A drawn from the run's seed, B zero, so training starts at the base model) and the loss of
    base + adapters; otherwise ``(None, params, gptfn.loss)``."""
    if not cfg.model.lora_rank:
        return None, params, loss
    options = lora_meta(cfg)
    adapters = lora.init(
        params, options["rank"], options["alpha"], tuple(options["targets"]), cfg.run.seed
    )
    return params, adapters, functools.partial(_lora_loss, params)


def _lora_loss(base: Params, adapters: Params, tokens: Any, targets: Any, **kwargs: Any) -> Any:
    """The loss of the base model with the adapters merged in (gradients reach the adapters
    only: the base is a constant here)."""
    return loss(lora.merge(base, adapters), tokens, targets, **kwargs)


def lora_meta(cfg: TrainConfig) -> dict[str, Any]:
    """What a LoRA run's checkpoints record to rebuild base + adapters: the base model (the
    run's ``--init-from``), the rank, alpha and target weights."""
    return {
        "base": cfg.model.init_from,
        "rank": cfg.model.lora_rank,
        "alpha": cfg.model.lora_alpha,
        "targets": list(lora_targets(cfg.model.lora_targets)),
    }
