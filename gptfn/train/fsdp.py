"""The loss and the training step over a sharded (FSDP) parameter tree.

:func:`sharded_loss` is ``gptfn.loss`` with one change: each piece of the tree is gathered
(``gptfn.distributed.gather_tree``) just before the model's own function uses it — the
embeddings for ``embed``, block i's leaves for the one ``gptfn.model.block``, the final norm
and unembedding for ``unembed`` — and dropped after. It mirrors ``forward``/``run_blocks``
(a dozen lines) rather than changing the model, so the model never learns about sharding.

:func:`make_sharded_train_step` takes the gradient with ``torch.autograd``, not ``torch.func``:
``torch.func`` cannot see DTensor (inside the transform a leaf is a plain tensor with no
``redistribute``, and the collectives' autograd functions lack ``setup_context``), while
``torch.autograd.grad`` differentiates through the gathers and returns gradients sharded like
the parameters (the all-gather's backward is a reduce-scatter). The optimizer then runs on the
DTensor shards unchanged (elementwise rules shard by shard; norms and clipping reduce over
ranks by DTensor's rules; Muon gathers each matrix for Newton–Schulz).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

import gptfn.optim as optim
from gptfn.checkpoint import load_checkpoint
from gptfn.distributed import (
    DistEnv,
    gather_tree,
    is_sharded,
    load_dcp,
    make_mesh,
    regather_saved,
    shard,
    unshard,
)
from gptfn.model import block, check_tokens, context, embed, unembed
from gptfn.settings import OptionError
from gptfn.train.options import TrainConfig
from gptfn.train.step import DTYPES, accumulate, logged_norm
from gptfn.tree import Tree


def sharded_loss(
    params: Tree, tokens: Tensor, targets: Tensor, *, dropout: float = 0.0, remat: bool = False
) -> Tensor:
    """``gptfn.loss(params, tokens, targets)`` for a tree of DTensor (or plain) leaves,
    gathering one block at a time. ``remat`` recomputes each block, its gather included, in the
    backward (``torch.utils.checkpoint``: saved-tensor hooks work outside ``torch.func``)."""
    check_tokens(params, tokens)
    check_tokens(params, targets, "targets", allow=1)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    ctx = context(params, positions, dropout=dropout)
    head = {k: params[k] for k in ("wte", "wpe", "config") if k in params}
    x = ctx.drop(embed(gather_tree(head), tokens, positions, ctx))
    for i, p in enumerate(params["blocks"]):

        def run(p: Tree, x: Tensor, i: int = i) -> Tensor:
            return block(gather_tree(p), x, ctx.at(i))

        if remat:
            x = torch.utils.checkpoint.checkpoint(run, p, x, use_reentrant=False)
        else:
            x = run(p, x)
    tail = gather_tree({"ln_f": params["ln_f"], "w": params.get("unembed", params["wte"])})
    # unembed reads params["wte"] even when "unembed" is there: both name the gathered weight
    tail = {"ln_f": tail["ln_f"], "wte": tail["w"], "unembed": tail["w"], "config": ctx.cfg}
    logits = unembed(tail, x, ctx)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


def _grads(
    loss_kwargs: dict[str, Any],
    autocast: torch.dtype | None,
    params: Tree,
    tokens: Tensor,
    targets: Tensor,
    scale: Tensor | None,
) -> tuple[Tree, Tensor]:
    """Gradients (summed over ranks, sharded like ``params``) of ``loss * scale`` on one
    micro-batch, and the unscaled loss."""
    leaves, spec = optree.tree_flatten(params)
    live = [leaf.detach().requires_grad_() for leaf in leaves]
    cast = (
        torch.autocast(tokens.device.type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    with cast, regather_saved():
        value = sharded_loss(optree.tree_unflatten(spec, live), tokens, targets, **loss_kwargs)
        value = value.float()
    grads = torch.autograd.grad(value * scale if scale is not None else value, live)
    return optree.tree_unflatten(spec, list(grads)), value.detach()


def _ranks(params: Tree) -> int:
    """How many ranks' gradients the gathers' backward sums (1 for a plain tree)."""
    for leaf in optree.tree_leaves(params):
        if isinstance(leaf, DTensor):
            return leaf.device_mesh.size()
    return 1


def _plain_scalar(x: Any) -> Any:
    """A 0-d DTensor as a plain tensor (the same on every rank); anything else unchanged."""
    return x.full_tensor() if isinstance(x, DTensor) and x.ndim == 0 else x


def make_sharded_train_step(
    tx: optim.GradientTransformation,
    *,
    accum_steps: int = 1,
    dtype: torch.dtype | str | None = None,
    **loss_kwargs: Any,
) -> Callable[[Tree, Tree, tuple[Tensor, Tensor]], tuple[Tree, Tree, dict[str, Tensor]]]:
    """``gptfn.train.make_train_step`` for a sharded tree (``gptfn.distributed.shard``): the
    same ``(params, opt_state, batch) -> (params, opt_state, metrics)`` contract, the same
    accumulation, autocast and loss scaling; each rank passes its rows of the global batch and
    the gradient is the mean over all of them. ``loss_kwargs``: ``dropout=``, ``remat=``."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    autocast = dtype if dtype in (torch.bfloat16, torch.float16) else None

    grad_fn = functools.partial(_grads, loss_kwargs, autocast)

    def step(params: Tree, opt_state: Tree, batch: tuple[Tensor, Tensor]):
        grads, loss_value, scale = accumulate(
            grad_fn, params, opt_state, batch, accum_steps, autocast
        )
        inv = 1.0 / (accum_steps * _ranks(params))
        grads = optree.tree_map(lambda g: g * (inv if scale is None else inv / scale), grads)
        grad_norm, remember = logged_norm(grads)  # clipping reuses it: one reduction over ranks
        with remember:
            updates, opt_state = tx.update(grads, opt_state, params)
        params = optim.apply_updates(params, updates)
        # scalars computed from shards (a loss scale from the gradients' norm) come out as 0-d
        # DTensors: keep them plain, as shard() left them
        opt_state = optree.tree_map(_plain_scalar, opt_state)
        metrics = {"loss": loss_value, "grad_norm": _plain_scalar(grad_norm)}
        return params, opt_state, metrics

    return step


# ----------------------------------------------------------------------------- the loop's part


def fsdp_mesh(cfg: TrainConfig, env: DistEnv) -> DeviceMesh | None:
    """The device mesh of an ``--fsdp`` run under torchrun, else None. ``--fsdp`` in one
    process trains as usual and says so; ``--mesh`` without ``--fsdp`` or ``--fsdp`` with
    ``--shard-optimizer`` are refused by name."""
    if not cfg.run.fsdp:
        if cfg.run.mesh:
            raise OptionError("mesh", cfg.run.mesh, "shapes an --fsdp run; add --fsdp")
        return None
    if cfg.run.compile:
        raise OptionError("compile", True, "compiling the --fsdp step is not supported yet")
    if cfg.model.lora_rank:
        raise OptionError("lora_rank", cfg.model.lora_rank, "LoRA with --fsdp is not supported")
    if cfg.run.shard_optimizer:
        raise OptionError(
            "shard_optimizer", True, "--fsdp shards the optimizer state already; drop it"
        )
    if env.world_size == 1:
        print(
            "--fsdp: not launched by torchrun, so this is one process holding the whole model "
            "(nothing to shard); checkpoints are the usual safetensors files",
            flush=True,
        )
        return None
    try:
        return make_mesh(env.device, cfg.run.mesh)
    except ValueError as err:
        raise OptionError("mesh", cfg.run.mesh, str(err)) from None


def load_state(
    path: Path,
    params: Tree,
    opt_state: Tree,
    device: str,
    partial: bool,
    params_template: Tree | None = None,
) -> tuple[Tree, Tree, dict]:
    """``(params, opt_state, meta)`` from a safetensors file or a DCP folder, laid out as the
    templates are (sharded or whole), whatever the world size that wrote it; the other
    arguments are :func:`gptfn.checkpoint.load_checkpoint`'s."""
    if path.is_dir():
        return load_dcp(path, params, opt_state)
    if not is_sharded(params):
        return load_checkpoint(path, opt_state, device, partial, params_template)
    whole_params, whole_opt, meta = load_checkpoint(path, unshard(opt_state), device)
    mesh = next(x for x in optree.tree_leaves(params) if isinstance(x, DTensor)).device_mesh
    return shard(whole_params, mesh), shard(whole_opt, mesh), meta
