"""The process's memory allocator during CPU training: keep what a step frees for the next step.

A CPU training step allocates the same activations every step and frees them by its end.
glibc's ``malloc`` (Linux) gives memory back to the system whenever more than its trim
threshold lies free at the top of the heap (a threshold it sets itself, from twice the largest
block it recently mapped), so the next step takes the same pages again, one page fault per 4 KB
touched: 2,000-5,600 faults a step on ``experiments/bench_train.py``'s float32 models, and
whether a given step pays them depends on what freed last. :func:`keep_freed_memory` sets the
policy PyTorch's own CPU launcher gets from tcmalloc or jemalloc (``torch.backends.xeon.run_cpu``):
blocks up to 32 MB come from the heap, and the heap is never trimmed, so freed memory is
reused, as CUDA's caching allocator reuses device memory. The process then holds its peak heap
until :func:`release_freed_memory`. Measured: docs/benchmarks.md, "the heap kept".
"""

from __future__ import annotations

import ctypes
import functools
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (<malloc.h>)
M_MMAP_THRESHOLD = -3
LARGEST_HEAP_BLOCK = 32 * 2**20  # glibc's largest mmap threshold on 64-bit: bigger blocks map
NEVER_TRIM = -1  # a trim threshold of -1 turns trimming off


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``mallopt`` and ``malloc_trim``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc alone has it (musl does not)  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Keep memory that is freed for reuse instead of returning it to the system (glibc).

    Process-wide and lasting, as ``torch.set_num_threads``: ``gptfn train`` on a CPU calls it
    before the first step (``--no-keep-memory`` to leave the allocator alone). Returns whether
    the policy took: False where the C library is not glibc (macOS, musl), which then keeps
    its own policy.

    Examples:
      >>> from gptfn.train import keep_freed_memory
      >>> kept = keep_freed_memory()  # True on Linux with glibc
    """
    libc = _glibc()
    if libc is None:
        return False
    heap_blocks = libc.mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)
    return bool(heap_blocks and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def release_freed_memory() -> bool:
    """Give the free memory the heap holds back to the system now (glibc's ``malloc_trim``);
    ``train`` calls it when a run ends. Returns whether any was given back."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
