"""Running totals of the per-step cost metrics, and peak memory: what the loop adds to every step's log."""

from __future__ import annotations

import resource

import torch

TOTALLED = ("tokens/", "compute/", "time/")  # per-step metrics that also get a running `<key>_total`


def accumulate_totals(totals: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
    """Add this step's token, compute and phase-time metrics into the running `<key>_total`s (not shares, `_frac`:
    a sum of shares means nothing)."""
    for key, value in metrics.items():
        summable = not key.endswith(("_total", "_frac")) and key not in ("time/total", "time/step")
        if key.startswith(TOTALLED) and summable:
            totals[f"{key}_total"] = totals.get(f"{key}_total", 0.0) + value
    return totals


def peak_cuda_mb() -> float | None:
    """Max memory allocated by tensors on the current CUDA device since start (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
