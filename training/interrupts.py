"""Stopping a run cleanly: Ctrl-C / SIGTERM end the current step, then a checkpoint is written.

Saving mid-step would store a state no uninterrupted run ever had, so the signal only sets a flag
that the training loop checks between steps. A second Ctrl-C aborts at once, without saving.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); the message says why and what was kept."""


class TrainingInterrupted(Exception):
    """Raised by the loop after a signal, once the final checkpoint is on disk."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (nothing trained yet)"
        super().__init__(
            f"stopped by {name} after step {step}; saved {where}"
            + (f"; continue with trainer.resume={checkpoint}" if checkpoint else "")
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for death by signal


class GracefulStop:
    """Context manager: while active, SIGINT/SIGTERM set `signum` instead of killing the process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        # what signal.signal returned: a handler, SIG_DFL or SIG_IGN (signal.Handlers, an int), or None
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
            "(Ctrl-C again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
