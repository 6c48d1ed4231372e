"""Checkpoints: one safetensors file holding params, optimizer state and JSON metadata.

A single file per checkpoint makes the write atomic (temp file + rename) and the read safe:
safetensors never unpickles. Keys are ``params.<dotted path>`` and ``opt.<dotted path>``; the
metadata (step, configs, tokenizer, best validation loss ...) is JSON under ``gptfn``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optree
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gptfn import lora
from gptfn.data.tokenizers import Tokenizer, tokenizer_from_json
from gptfn.distributed.dcp import read_dcp, read_dcp_meta
from gptfn.files import atomic_write
from gptfn.model import GPTConfig, check_params
from gptfn.pretrained import load_pretrained
from gptfn.tree import Tree, flatten, unflatten


def _opt_paths(state: Tree) -> tuple[list[str], list[torch.Tensor], Any]:
    paths, leaves, spec = optree.tree_flatten_with_path(state)
    return [".".join(map(str, p)) for p in paths], leaves, spec


def flat_state(opt_state: Tree) -> dict[str, torch.Tensor]:
    """``{dotted path: tensor}`` of an optimizer state (the checkpoint's ``opt.*`` names)."""
    names, leaves, _ = _opt_paths(opt_state)
    return dict(zip(names, leaves))


def save_checkpoint(
    path: str | Path,
    params: Tree,
    opt_state: Tree | None,
    meta: dict,
    flat_opt: dict[str, torch.Tensor] | None = None,
) -> None:
    """Atomically write ``params``, ``opt_state`` and ``meta`` to ``path`` (.safetensors).
    ``flat_opt`` (from :func:`flat_state`, possibly merged over ranks) replaces ``opt_state``."""
    tensors = {f"params.{k}": v.detach().contiguous().cpu() for k, v in flatten(params).items()}
    if flat_opt is None and opt_state is not None:
        flat_opt = flat_state(opt_state)
    if flat_opt is not None:
        tensors |= {f"opt.{n}": v.detach().contiguous().cpu() for n, v in flat_opt.items()}
    metadata = {"gptfn": json.dumps(meta)}
    if isinstance(params, dict) and isinstance(params.get("config"), GPTConfig):
        metadata["gptfn.config"] = json.dumps(params["config"].to_dict())  # the architecture
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        tensors = load_file(str(path))

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        meta = json.loads(metadata["gptfn"])
        config = json.loads(metadata["gptfn.config"]) if "gptfn.config" in metadata else None
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise ValueError(f"corrupt or foreign checkpoint {path}: {err}") from None
    return tensors, meta, config


def read_meta(path: str | Path) -> dict:
    """A checkpoint's JSON metadata alone (step, model, tokenizer ...), without its tensors;
    ``path`` may be an FSDP run's DCP folder."""
    path = Path(path)
    if path.is_dir():
        return read_dcp_meta(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["gptfn"])
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise ValueError(f"corrupt or foreign checkpoint {path}: {err}") from None


def load_checkpoint(
    path: str | Path,
    opt_template: Tree | None = None,
    device: torch.device | str = "cpu",
    partial: bool = False,
    params_template: Tree | None = None,
) -> tuple[Tree, Tree | None, dict]:
    """Read a checkpoint: ``(params, opt_state, meta)``.

    ``opt_template`` (e.g. ``tx.init(params)``) gives the optimizer state its structure; without
    it ``opt_state`` is None. A template that does not match the saved state is an error, except
    that with ``partial`` the saved state may hold more (a rank's shard of a full state).
    ``params_template`` does the same for the saved tree when it is not a model (a LoRA run's
    adapters); without it the file's tree is a model, its architecture re-attached and checked.
    """
    path = Path(path)
    tensors, meta, config = _read(path)
    if params_template is not None:
        params = _restore(tensors, "params", params_template, path, "parameters", device)
    else:
        params = unflatten(
            {k[7:]: v.to(device) for k, v in tensors.items() if k.startswith("params.")}
        )
        if isinstance(meta.get("model"), dict):  # training's record of the model, every field
            meta["model"] = GPTConfig.from_dict(meta["model"]).to_dict()  # (older files: fewer)
            config = meta["model"] if config is None else config
        if config is not None:  # re-attach the architecture (files without any: GPT-2 shapes)
            params["config"] = GPTConfig.from_dict(config)
            check_params(params)
    opt_state = None
    if opt_template is not None:
        opt_state = _restore(tensors, "opt", opt_template, path, "optimizer state", None, partial)
    return params, opt_state, meta


def _restore(
    tensors: dict[str, torch.Tensor],
    prefix: str,
    template: Tree,
    path: Path,
    what: str,
    device: torch.device | str | None,
    partial: bool = False,
) -> Tree:
    """``template``'s tree with each leaf read from ``{prefix}.{dotted path}`` (on the
    template leaf's device and dtype, or ``device``); a mismatch names what differs."""
    names, leaves, spec = _opt_paths(template)
    saved = {k[len(prefix) + 1 :] for k in tensors if k.startswith(prefix + ".")}
    if not set(names) <= saved or (not partial and saved != set(names)):
        missing, extra = sorted(set(names) - saved)[:3], sorted(saved - set(names))[:3]
        this, hint = (
            ("this optimizer", "another --optimizer")
            if prefix == "opt"
            else ("these adapters", "other --lora-* options")
        )
        raise ValueError(
            f"{what} in {path} does not match {this} (missing {missing}, unexpected {extra}): "
            f"was it {hint}?"
        )
    restored = []
    for name, like in zip(names, leaves):
        value = tensors[f"{prefix}.{name}"]
        if value.shape != like.shape:
            raise ValueError(
                f"{what} {name} has shape {tuple(value.shape)} in {path}, "
                f"expected {tuple(like.shape)}"
            )
        restored.append(value.to(device=device or like.device, dtype=like.dtype))
    return optree.tree_unflatten(spec, restored)


def checkpoint_path(run_dir: str | Path, which: str = "last") -> Path:
    """``RUN_DIR/last.safetensors`` or ``RUN_DIR/best.safetensors``."""
    if which not in ("last", "best"):
        raise ValueError(f"which must be 'last' or 'best', got {which!r}")
    return Path(run_dir) / f"{which}.safetensors"


def latest_checkpoint(run_dir: str | Path, which: str = "last") -> Path:
    """``RUN_DIR/last.safetensors``, or the FSDP run's ``RUN_DIR/last.dcp`` folder when only it
    exists or it holds a later step (a run may have switched between the two)."""
    file = checkpoint_path(run_dir, which)
    folder = file.with_suffix(".dcp")
    if not folder.is_dir():
        return file
    if not file.is_file() or read_dcp_meta(folder)["step"] >= read_meta(file)["step"]:
        return folder
    return file


def read_dcp_checkpoint(folder: str | Path) -> tuple[Tree, dict[str, torch.Tensor], dict]:
    """An FSDP run's DCP folder read whole in one process: ``(params, {opt path: tensor},
    meta)``, params with their config attached and checked as :func:`load_checkpoint` does."""
    tensors, meta = read_dcp(folder)
    params = unflatten({k[7:]: v for k, v in tensors.items() if k.startswith("params.")})
    meta["model"] = GPTConfig.from_dict(meta["model"]).to_dict()
    params["config"] = GPTConfig.from_dict(meta["model"])
    check_params(params)
    return params, {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, meta


def consolidate(folder: str | Path, out: str | Path) -> dict:
    """Write an FSDP run's DCP folder as one usual safetensors checkpoint; returns its meta."""
    params, flat_opt, meta = read_dcp_checkpoint(folder)
    save_checkpoint(out, params, None, meta, flat_opt=flat_opt)
    return meta


def load_run(run_dir: str | Path, which: str = "last") -> tuple[Tree, Tokenizer, dict]:
    """``params, tokenizer, meta`` of a training run's latest (or best) checkpoint; a LoRA
    run's params are its base model with the adapters merged in."""
    base, trained, tokenizer, meta = load_run_parts(run_dir, which)
    return (trained if base is None else lora.merge(base, trained)), tokenizer, meta


def load_run_parts(
    run_dir: str | Path, which: str = "last"
) -> tuple[Tree | None, Tree, Tokenizer, dict]:
    """``(base, trained, tokenizer, meta)`` of a run's checkpoint: for a LoRA run the frozen base
    model (read again from ``meta["lora"]["base"]``, the run's ``--init-from``) and the trained
    adapters; otherwise ``None`` and the params."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    path = latest_checkpoint(run_dir, which)
    if path.is_dir():  # an --fsdp run's DCP folder
        params, _, meta = read_dcp_checkpoint(path)
        return None, params, tokenizer_from_json(meta["tokenizer"]), meta
    meta = read_meta(path)
    if "lora" not in meta:
        params, _, meta = load_checkpoint(path)
        return None, params, tokenizer_from_json(meta["tokenizer"]), meta
    base = lora_base(meta)
    adapters, _, meta = load_checkpoint(path, params_template=lora_template(base, meta))
    return base, adapters, tokenizer_from_json(meta["tokenizer"]), meta


def lora_base(meta: dict, device: torch.device | str = "cpu") -> Tree:
    """The frozen base model of a LoRA run (float32), as its ``--init-from`` names it."""
    source = meta["lora"]["base"]
    try:
        return load_pretrained(source, dtype=torch.float32, device=device)
    except (FileNotFoundError, OSError) as err:
        raise FileNotFoundError(
            f"this LoRA run adapts {source}, which cannot be read now: {err}"
        ) from None


def lora_template(base: Tree, meta: dict) -> Tree:
    """Adapters shaped as a LoRA run's (its rank, alpha and targets), to read the saved ones."""
    options = meta["lora"]
    return lora.init(base, options["rank"], options["alpha"], tuple(options["targets"]))
