"""Batches from token files: seeded random windows for training, sequential ones for evaluation.

The training batch of step ``s`` depends only on ``(seed, s)`` — not on earlier batches — so a
resumed run sees exactly the batches an uninterrupted one would, and data-parallel ranks can
each take a slice of the same global batch. A background thread prepares batches ahead of time;
on CUDA they are pinned and copied without blocking.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gptfn.data.prepare import load_meta

Batch = tuple[Tensor, Tensor]


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """Memory-map ``{split}.bin`` of a prepared directory (little-endian, see ``prepare``)."""
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"missing token file {path}")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")


def _to_device(x: np.ndarray, device: torch.device) -> Tensor:
    t = torch.from_numpy(x.astype(np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def random_batch(
    data: np.ndarray,
    batch_size: int,
    block_size: int,
    seed: int,
    step: int,
    device: torch.device | str = "cpu",
) -> Batch:
    """``batch_size`` random windows (inputs, next-token targets); a pure function of
    ``(seed, step)``."""
    if len(data) <= block_size:
        raise ValueError(
            f"token file has {len(data)} tokens, need more than block_size {block_size}"
        )
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - block_size, size=batch_size)
    windows = data[starts[:, None] + np.arange(block_size + 1)]
    device = torch.device(device)
    return _to_device(windows[:, :-1], device), _to_device(windows[:, 1:], device)


def sequential_batches(
    data: np.ndarray, batch_size: int, block_size: int, device: torch.device | str = "cpu"
) -> Iterator[Batch]:
    """Non-overlapping windows covering every token once (each scored as a target once); the
    last window is padded with target -1 (ignored by the loss)."""
    device = torch.device(device)
    n_targets = len(data) - 1
    starts = list(range(0, n_targets, block_size))
    for i in range(0, len(starts), batch_size):
        xs = np.zeros((len(starts[i : i + batch_size]), block_size), dtype=np.int64)
        ys = np.full_like(xs, -1)
        for row, s in enumerate(starts[i : i + batch_size]):
            n = min(block_size, n_targets - s)
            xs[row, :n] = data[s : s + n]
            ys[row, :n] = data[s + 1 : s + 1 + n]
        yield _to_device(xs, device), _to_device(ys, device)


class Prefetcher:
    """Iterates ``make(step)`` for steps ``start, start+1, ...`` with ``depth`` batches prepared
    ahead by a daemon thread. :meth:`close` stops the thread (a loop that ends early calls it)."""

    def __init__(self, make: Callable[[int], Batch], start: int, stop: int, depth: int = 4) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(make, start, stop), daemon=True)
        self._thread.start()

    def _put(self, item: tuple) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, make: Callable[[int], Batch], start: int, stop: int) -> None:
        for step in range(start, stop):
            try:
                item = (step, make(step), None)
            except BaseException as err:  # hand errors to the consumer instead of dying quietly
                self._put((step, None, err))
                return
            if not self._put(item):
                return
        self._put((stop, None, StopIteration()))

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        return self

    def __next__(self) -> tuple[int, Batch]:
        step, batch, err = self._queue.get()
        if err is not None:
            raise err
        return step, batch

    def close(self) -> None:
        """Stop preparing batches and let the thread end."""
        self._closed.set()
        self._thread.join(timeout=5)
