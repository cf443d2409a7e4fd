"""DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2): keep only groups whose scores differ, draw more.

A group whose G samples all score the same has zero group-relative advantage: it costs a full update
and carries no gradient (only the KL's). The step keeps the groups with a spread, draws the next
prompts_per_step prompts from the same sampler (data.loading.Batch.refill: so the data position, which the
loop checkpoints, stays exact on resume), samples and scores them, and repeats until the batch holds
prompts_per_step informative groups or `max_draws` extra draws are spent; then dropped groups fill the
rest, so that every step trains on the same number of sequences. Every drawn sample's generation is
counted in the step's cost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor

from algorithms.rollout import Rollout, pad_to
from data.loading import Batch
from parallel.distributed import all_ranks
from rewards.combine import RewardOutput


def informative_groups(scores: Tensor, group_size: int) -> Tensor:
    """[P] bool: the groups of scores [N] (group-contiguous) whose samples do not all score the same."""
    grouped = rearrange(scores, "(p g) -> p g", g=group_size)  # [P, G]
    return grouped.max(dim=1).values > grouped.min(dim=1).values


def group_scores(scored: RewardOutput, metric: str) -> Tensor:
    """[N] the scores dynamic sampling compares within a group: the total, or one component's."""
    if metric == "total":
        return scored.total
    if metric not in scored.parts:
        choices = ", ".join(["total", *sorted(scored.parts)])
        raise ValueError(f"algo.dynamic_sampling_metric={metric} is not a reward here; choose one of: {choices}")
    return scored.parts[metric]


def select_rollouts(parts: list[tuple[Rollout, Tensor]], pad_id: int) -> Rollout:
    """One Rollout of the samples `index` [n] picks from each rollout, in order: prompts left-padded and
    completions right-padded to the widest."""
    tp = max(r.prompt_ids.shape[1] for r, _ in parts)
    tc = max(r.completion_ids.shape[1] for r, _ in parts)

    def cat(name: str, width: int, value: float, left: bool) -> Tensor:
        return torch.cat([pad_to(getattr(r, name)[i], width, value, left) for r, i in parts])

    return Rollout(
        prompt_ids=cat("prompt_ids", tp, pad_id, True),
        prompt_mask=cat("prompt_mask", tp, 0, True),
        completion_ids=cat("completion_ids", tc, pad_id, False),
        completion_mask=cat("completion_mask", tc, 0, False),
        logp=cat("logp", tc, 0.0, False),
        truncated=torch.cat([r.truncated[i] for r, i in parts]),
        prompts=[r.prompts[j] for r, i in parts for j in i.tolist()],
        completions=[r.completions[j] for r, i in parts for j in i.tolist()],
        rows=[r.rows[j] for r, i in parts for j in i.tolist()],
    )


def select_scores(parts: list[tuple[RewardOutput, Tensor]]) -> RewardOutput:
    """The scores of the picked samples; failures, timeouts and reward-model tokens of every draw (they
    were spent whether the sample was kept or not)."""
    counts: dict[str, dict[str, int]] = {"failures": {}, "timeouts": {}, "model_tokens": {}}
    for scored, _ in parts:
        for field_name, total in counts.items():
            for name, n in getattr(scored, field_name).items():
                total[name] = total.get(name, 0) + n
    return RewardOutput(
        total=torch.cat([s.total[i] for s, i in parts]),
        parts={name: torch.cat([s.parts[name][i] for s, i in parts]) for name in parts[0][0].parts},
        failures=counts["failures"],
        model_tokens=counts["model_tokens"],
        timeouts=counts["timeouts"],
    )


@dataclass
class DrawCost:
    """What a step logs about its draws beyond the batch it trains on (nothing without dynamic sampling)."""

    metrics: dict[str, float] = field(default_factory=dict)
    prompt_tokens: float = 0.0  # real prompt / generated tokens of samples drawn but not trained on
    generated_tokens: float = 0.0


@dataclass
class Refilled:
    rollout: Rollout  # the kept groups (then fill), group-contiguous, len(batch.rows) groups
    scored: RewardOutput
    cost: DrawCost


def refill_groups(
    batch: Batch,
    first: tuple[Rollout, RewardOutput],
    sample: Callable[[Batch], tuple[Rollout, RewardOutput]],
    group_size: int,
    max_draws: int,
    pad_id: int,
    metric: str = "total",
) -> Refilled:
    """Dynamic sampling from the first draw's (rollout, scores) of `batch`: the informative groups of up to
    1 + max_draws draws (each `sample(batch.refill())`), the first len(batch.rows) of them in draw order,
    topped up with dropped groups when too few. Under data parallelism every rank draws until all ranks are
    full (the draws pair up with the sampler's global batches). `metric`: total, or the reward component whose
    spread decides."""
    target = len(batch.rows)
    draws = [first]
    kept: list[tuple[int, int]] = []  # (draw, group) of informative groups
    dropped: list[tuple[int, int]] = []
    while True:
        rollout, scored = draws[-1]
        mask = informative_groups(group_scores(scored, metric), group_size).tolist()
        for g, informative in enumerate(mask):
            (kept if informative else dropped).append((len(draws) - 1, g))
        if all_ranks(len(kept) >= target) or len(draws) > max_draws or batch.refill is None:
            break
        draws.append(sample(batch.refill()))
    chosen = (kept + dropped)[:target]
    picks: dict[int, list[int]] = {}
    for d, g in sorted(chosen):  # draw order, then group order
        picks.setdefault(d, []).extend(range(g * group_size, (g + 1) * group_size))
    index = {d: torch.tensor(samples) for d, samples in picks.items()}
    rollout = select_rollouts([(draws[d][0], i) for d, i in index.items()], pad_id)
    scored = select_scores([(draws[d][1], index.get(d, torch.tensor([], dtype=torch.long))) for d in range(len(draws))])
    drawn_prompt = sum(float(r.prompt_mask.sum()) for r, _ in draws)
    drawn_generated = sum(float(r.completion_mask.sum()) for r, _ in draws)
    drawn_scores = torch.cat([s.total for _, s in draws])
    metrics = {
        "dynamic_sampling/prompts_drawn": float(len(draws) * target),
        "dynamic_sampling/groups_dropped": float(len(dropped)),
        "dynamic_sampling/extra_draws": float(len(draws) - 1),
        "dynamic_sampling/filled_groups": float(max(target - len(kept), 0)),  # zero-spread groups trained on
        "dynamic_sampling/reward_mean_drawn": float(drawn_scores.mean()),  # over every sample drawn
    }
    return Refilled(
        rollout,
        scored,
        DrawCost(
            metrics,
            drawn_prompt - float(rollout.prompt_mask.sum()),
            drawn_generated - float(rollout.completion_mask.sum()),
        ),
    )
