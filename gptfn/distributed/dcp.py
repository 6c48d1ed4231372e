"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): one folder per checkpoint.

Every rank writes its own shards (no rank gathers the model), and DCP records each shard's
place in the whole tensor, so a folder written by 4 ranks loads on 2, or on one process:
:func:`load_dcp` fills a template sharded as the reader wants it. Keys are those of the
safetensors checkpoints: ``params.<dotted path>`` and ``opt.<dotted path>``; the JSON metadata
(step, configs, tokenizer ...) is ``meta.json`` beside DCP's files. A folder appears whole or
not at all: it is written as ``NAME.tmp`` and renamed by rank 0 after every rank finished.

DCP's own ``.metadata`` file is a pickle (unlike safetensors): read only folders you trust.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import optree
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from gptfn.tree import Tree, flatten

META = "meta.json"


def _state(params: Tree, opt_state: Tree | None) -> dict[str, Tensor]:
    """The flat DCP state: ``params.*`` and ``opt.*`` keys (the safetensors names)."""
    state = {f"params.{k}": v for k, v in flatten(params).items()}
    if opt_state is not None:
        paths, leaves, _ = optree.tree_flatten_with_path(opt_state)
        state |= {"opt." + ".".join(map(str, p)): v for p, v in zip(paths, leaves)}
    return state


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def save_dcp(folder: str | Path, params: Tree, opt_state: Tree | None, meta: dict) -> None:
    """Write ``params`` and ``opt_state`` (DTensor or plain leaves) and ``meta`` to ``folder``
    from every rank together; rank 0 swaps the finished folder into place."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    main = not _distributed() or dist.get_rank() == 0
    if main and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    state = {k: v.detach() for k, v in _state(params, opt_state).items()}
    dcp.save(state, checkpoint_id=str(tmp))
    if main:
        (tmp / META).write_text(json.dumps(meta), encoding="utf-8")
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        if old.exists():
            shutil.rmtree(old)
    _barrier()


def read_dcp_meta(folder: str | Path) -> dict:
    """A DCP checkpoint's JSON metadata (step, model, tokenizer ...), without its tensors."""
    path = Path(folder) / META
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {folder} (no {META})")
    return json.loads(path.read_text(encoding="utf-8"))


def load_dcp(
    folder: str | Path, params: Tree, opt_state: Tree | None
) -> tuple[Tree, Tree | None, dict]:
    """``(params, opt_state, meta)`` read from ``folder`` into the templates' layouts (DTensor
    leaves are read as this mesh shards them; plain leaves whole). A template key that the
    folder lacks, or a shape that differs, is an error naming it."""
    folder = Path(folder)
    state = {k: v.detach().clone() for k, v in _state(params, opt_state).items()}
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    for key, value in state.items():
        there = saved.get(key)
        if not isinstance(there, TensorStorageMetadata):
            raise ValueError(f"checkpoint {folder} has no tensor {key}: another optimizer?")
        if tuple(there.size) != tuple(value.shape):
            raise ValueError(
                f"{key} has shape {tuple(there.size)} in {folder}, expected {tuple(value.shape)}"
            )
    dcp.load(state, checkpoint_id=str(folder))
    new_params = _refill(params, state, "params.")
    new_opt = None if opt_state is None else _refill(opt_state, state, "opt.")
    return new_params, new_opt, read_dcp_meta(folder)


def _refill(template: Tree, state: dict[str, Tensor], prefix: str) -> Tree:
    paths, _, spec = optree.tree_flatten_with_path(template)
    return optree.tree_unflatten(spec, [state[prefix + ".".join(map(str, p))] for p in paths])


def read_dcp(folder: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Every tensor of a DCP checkpoint, whole, in this one process: ``({key: tensor}, meta)``
    (keys ``params.*`` / ``opt.*``). For ``gptfn export`` and ``load_run``."""
    folder = Path(folder)
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    state: dict[str, Any] = {
        key: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for key, m in saved.items()
        if isinstance(m, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return state, read_dcp_meta(folder)
