"""Per-rank memory of FSDP training: params + grads + optimizer state, and the peak in a step.

Run under torchrun with 1, 2 and 4 processes (CPU, gloo)::

    for n in 1 2 4; do torchrun --standalone --nproc-per-node $n experiments/fsdp_memory.py; done

The CPU has no allocator statistics, so the peak is counted by a dispatch mode that sees every
tensor an op makes and adds its storage's bytes while the storage lives (params, optimizer state
and the batch are counted from the start). The batch is tiny (1 x 16 tokens) so that activations
do not hide the parameters. ``no regather`` is the same step with autograd keeping the gathered
weights for the backward (the saved-tensor hooks off), to show what they save.
"""

from __future__ import annotations

import contextlib
import weakref

import optree
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import gptfn
import gptfn.train.fsdp as fsdp_step
from gptfn.distributed import local, local_bytes, make_mesh, shard

CFG = gptfn.GPTConfig(vocab_size=59, n_layer=8, n_head=4, n_embd=128, block_size=16)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive now, and the most seen at once."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()
        for t in tensors:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._drop, key, storage.nbytes())

    def _drop(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in optree.tree_leaves(out):
            if type(t) is torch.Tensor and t.device.type == "cpu":  # not DTensor wrappers
                self._add(t)
        return out


def measure(regather: bool) -> tuple[int, int, int]:
    """(params, optimizer state, peak in one step) bytes on this rank."""
    mesh = make_mesh("cpu")
    params = shard(gptfn.init(CFG, 0), mesh)
    tx = gptfn.optim.adamw(1e-3)
    opt_state = shard(tx.init(gptfn.init(CFG, 0)), mesh)
    step = fsdp_step.make_sharded_train_step(tx)
    tokens = torch.randint(0, CFG.vocab_size, (1, CFG.block_size))
    step(params, opt_state, (tokens, tokens))  # warm-up (first-call caches)
    saved = fsdp_step.regather_saved
    fsdp_step.regather_saved = saved if regather else contextlib.nullcontext
    start = [*optree.tree_leaves(local(params)), *optree.tree_leaves(local(opt_state)), tokens]
    try:
        with LiveBytes(start) as tracker:
            params, opt_state, _ = step(params, opt_state, (tokens, tokens))
    finally:
        fsdp_step.regather_saved = saved
    return local_bytes(params), local_bytes(opt_state), tracker.peak


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    p, o, peak = measure(regather=True)
    *_, peak_plain = measure(regather=False)
    whole = sum(x.numel() * 4 for x in optree.tree_leaves(gptfn.init(CFG, 0)))
    block = whole // CFG.n_layer  # about one block (the embeddings are small here)
    if rank == 0:
        mib = 2**20
        print(
            f"| {world} | {p / mib:.2f} | {p / mib:.2f} | {o / mib:.2f} | "
            f"{(2 * p + o) / mib:.2f} | {peak / mib:.2f} | {peak_plain / mib:.2f} | "
            f"{(whole * 4 / world + block) / mib:.2f} |"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
