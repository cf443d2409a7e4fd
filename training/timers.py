"""Wall and CPU time per phase of a step (generate, score, reference, train, ...)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


class PhaseTimer:
    """Wall time and CPU time of this process per phase (generate, score, reference, train, ...), in seconds.

    CPU time is what a phase computed, whatever else the machine was running; on a shared CPU it is the
    steadier of the two (with one torch thread it is close to the wall time of an idle machine).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start
            self.cpu_seconds[phase] += time.process_time() - cpu_start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()} | {
            f"cpu_time/{k}": v for k, v in self.cpu_seconds.items()
        }
