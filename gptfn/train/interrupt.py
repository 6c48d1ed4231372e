"""Stopping a training run cleanly: the first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop
after its current step and save; a second one stops at once."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal; ``checkpoint`` (None after a second signal) holds the
    last finished ``step``. A ``KeyboardInterrupt``, so ``except Exception`` lets it pass."""

    def __init__(self, signum: int, step: int | None, checkpoint: Path | None) -> None:
        name = signal.Signals(signum).name
        saved = f"saved step {step} to {checkpoint}" if checkpoint else "nothing saved"
        super().__init__(f"interrupted by {name}: {saved}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopSignal:
    """Inside ``with StopSignal():``, SIGINT and SIGTERM set ``signum`` (the loop stops after
    its step); a second signal raises :class:`TrainingInterrupted` at once. It does nothing
    outside the main thread (only there can Python handle signals) or when not ``active``."""

    def __init__(self, active: bool = True) -> None:
        self.signum: int | None = None
        self.active = active
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(signum, None, None)
        self.signum = signum
        name = signal.Signals(signum).name
        message = f"\n{name}: finishing this step, then saving (again to stop at once)\n"
        os.write(2, message.encode())  # print() here could re-enter a print in progress

    def __enter__(self) -> StopSignal:
        if self.active and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
