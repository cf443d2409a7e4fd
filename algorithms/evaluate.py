"""Held-out evaluation of a policy: one seeded sample per row, scored by the run's rewards (the RL
algorithms' in-training eval and the eval stage share it)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from algorithms.common import rollout_metrics
from algorithms.rollout import Rollout, generate_rollout
from rewards.combine import RewardOutput


def combine_batches(key: str, batches: list[tuple[int, dict[str, float]]], total: int) -> float:
    """One metric over all eval batches: extremes of extremes, sums of counts, weighted means of means."""
    values = [metrics[key] for _, metrics in batches]
    if key.endswith("_max"):
        return max(values)
    if key.endswith("_min"):
        return min(values)
    if key.endswith(("_failures", "_timeouts")) or key == "tokens/generated":
        return sum(values)
    return sum(n * metrics[key] for n, metrics in batches) / total


def evaluate_policy(policy, tokenizer, rows: list[dict], reward_fn, sampling: dict, batch_size: int, seed: int
                    ) -> tuple[dict[str, float], list[tuple[Rollout, RewardOutput]]]:
    """One sample per row, in batches, seeded by `seed`: (rollout metrics over all rows, every batch's
    (rollout, scores)). `sampling`: max_new_tokens, temperature, top_p. No rows: ({}, [])."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[tuple[int, dict[str, float]]] = []  # (prompts, that batch's metrics)
    scored_batches = []
    for start in tqdm(range(0, len(rows), batch_size), desc="eval", leave=False, dynamic_ncols=True):
        batch_rows = rows[start : start + batch_size]
        rollout = generate_rollout(policy, tokenizer, batch_rows, 1, generator=generator, **sampling)
        scored = reward_fn(rollout.prompts, rollout.completions, rollout.rows)
        batches.append((len(batch_rows), rollout_metrics(rollout, scored.total, scored.parts, scored.failures,
                                                         scored.timeouts)))
        scored_batches.append((rollout, scored))
    if not batches:
        return {}, []
    metrics = {key: combine_batches(key, batches, len(rows)) for key in batches[0][1] if not key.endswith("_std")}
    return metrics, scored_batches
