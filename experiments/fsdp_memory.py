"""Per-rank memory of FSDP training: params + grads + optimizer state, and the peak in a step.

Run under torchrun with 1, 2 and 4 processes (CPU, gloo)::

    for n in 1 2 4; do MALLOC_MMAP_THRESHOLD_=65536 \
        torchrun --standalone --nproc-per-node $n experiments/fsdp_memory.py; done

The CPU has no allocator statistics, so the peak is the process's resident-memory high-water
mark during the step (Linux ``VmHWM``, reset before it) above the memory resident before it,
plus the params and optimizer state (resident before it). Run with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the system at once (glibc
otherwise keeps some, and the high-water mark would count reuse late). The batch is tiny
(1 x 16 tokens) so that activations do not hide the parameters. Peaks: of the forward and
backward (with the re-gather hooks, and without them: autograd then keeps every gathered weight
for the backward), and of the whole step (the functional optimizer update included).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import torch
import torch.distributed as dist

import gptfn
from gptfn.distributed import local_bytes, make_mesh, regather_saved, shard
from gptfn.train.fsdp import make_sharded_train_step, sharded_loss

CFG = gptfn.GPTConfig(vocab_size=59, n_layer=8, n_head=4, n_embd=256, block_size=16)


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory figure (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_extra(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(the most resident memory ``fn`` added above what was resident before, its result):
    the kernel's high-water mark, reset first (``/proc/self/clear_refs``)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    out = fn()
    return _status("VmHWM") - before, out


def grad_phase(params: Any, tokens: torch.Tensor, regather: bool) -> Any:
    """Forward and backward over the sharded tree, with or without the re-gather hooks."""
    leaves, spec = optree.tree_flatten(params)
    live = [x.detach().requires_grad_() for x in leaves]
    with regather_saved() if regather else contextlib.nullcontext():
        value = sharded_loss(optree.tree_unflatten(spec, live), tokens, tokens)
    return torch.autograd.grad(value, live)


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        print("set MALLOC_MMAP_THRESHOLD_=65536 for a faithful peak (see the docstring)")
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = make_mesh("cpu")
    tx = gptfn.optim.adamw(1e-3)
    params = shard(gptfn.init(CFG, 0), mesh)
    opt_state = shard(tx.init(gptfn.init(CFG, 0)), mesh)
    step = make_sharded_train_step(tx)
    tokens = torch.randint(0, CFG.vocab_size, (1, CFG.block_size))
    step(params, opt_state, (tokens, tokens))  # warm-up (first-call caches)
    p, o = local_bytes(params), local_bytes(opt_state)
    fb = peak_extra(lambda: grad_phase(params, tokens, True))[0]
    fb_kept = peak_extra(lambda: grad_phase(params, tokens, False))[0]
    whole_step = peak_extra(lambda: step(params, opt_state, (tokens, tokens)))[0]
    total = sum(x.numel() * 4 for x in optree.tree_leaves(gptfn.init(CFG, 0)))
    block = total // CFG.n_layer  # about one block's weights (the embeddings are small here)
    if dist.get_rank() == 0:
        cells = [p, p, o, 2 * p + o, p + o + fb, p + o + fb_kept, p + o + whole_step]
        cells.append(4 * total / world + block)
        print(f"| {world} | " + " | ".join(f"{c / 2**20:.1f}" for c in cells) + " |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
