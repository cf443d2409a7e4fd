"""Whole groups moved between data-parallel ranks so that each trains on about the same number of real tokens.

Each rank samples and scores its own prompts (parallel.distributed.ShardedSampler); with long, uneven completions
one rank can draw several times the tokens of another, and every rank then waits for it at each gradient
all-reduce. After scoring, the ranks exchange their groups and each keeps the same number of them, chosen by
`parallel.balance.equal_count_partition` on the groups' real tokens (a shared prompt once, as the passes run it):
every pass after it (old log-probs, reference, critic, the update) sees balanced work. A group stays whole, so
group statistics are unchanged; every rank keeps its count of sequences, so per-sequence loss weights are too;
token means are taken over every rank's tokens (training.update's `mean_sync`), so no loss depends on which rank
holds a sequence. What stays with the rank that drew it: its reward failures, timeouts and reward-model tokens
(the work was done there) and its dynamic-sampling cost.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from algorithms.dynamic_sampling import select_rollouts, select_scores
from algorithms.rollout import Rollout
from parallel.balance import equal_count_partition, load_spread
from parallel.distributed import all_gather_objects, rank, world_size
from rewards.combine import RewardOutput

__all__ = ["balance_ranks", "group_tokens"]


def group_tokens(rollout: Rollout, group_size: int) -> list[int]:
    """[P] real tokens of each group: its prompt once and its G completions."""
    prompt = rollout.prompt_mask[::group_size].sum(-1)  # [P]
    completions = rollout.completion_mask.sum(-1).view(-1, group_size).sum(-1)  # [P]
    return [int(t) for t in (prompt + completions).tolist()]


def _rollout_to(rollout: Rollout, device: torch.device) -> Rollout:
    fields = {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}
    moved: dict[str, Any] = {k: v.to(device) for k, v in fields.items() if isinstance(v, Tensor)}
    return dataclasses.replace(rollout, **moved)


def _scores_to(scored: RewardOutput, device: torch.device) -> RewardOutput:
    parts = {k: v.to(device) for k, v in scored.parts.items()}
    return dataclasses.replace(scored, total=scored.total.to(device), parts=parts)


def balance_ranks(
    rollout: Rollout, scored: RewardOutput, group_size: int, pad_id: int
) -> tuple[Rollout, RewardOutput, dict[str, float]]:
    """This rank's share of every rank's groups after balancing (see the module), in global order, and the
    metrics `ranks/load_spread_before` and `ranks/load_spread` (the heaviest rank's real tokens over the mean).
    One process: returned as they are."""
    world = world_size()
    if world == 1:
        return rollout, scored, {}
    costs = [c for part in all_gather_objects(group_tokens(rollout, group_size)) for c in part]
    per_rank = len(costs) // world
    before = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(world)]
    partition = equal_count_partition(costs, world)
    cpu = torch.device("cpu")
    # every rank's whole batch on every rank: simple, and small beside a step's passes (token ids and scores)
    everyone: list[tuple[Rollout, RewardOutput]] = all_gather_objects(
        (_rollout_to(rollout, cpu), _scores_to(scored, cpu))
    )
    picks: dict[int, list[int]] = {}
    for g in partition[rank()]:
        source, j = divmod(g, per_rank)
        picks.setdefault(source, []).extend(range(j * group_size, (j + 1) * group_size))
    index = {r: torch.tensor(i, dtype=torch.long) for r, i in sorted(picks.items())}
    mine = select_rollouts([(everyone[r][0], i) for r, i in index.items()], pad_id)
    kept = select_scores([(everyone[r][1], i) for r, i in index.items()])
    # the work of scoring was done where the samples were drawn: its counts stay there
    kept = dataclasses.replace(
        _scores_to(kept, scored.total.device),
        failures=scored.failures,
        timeouts=scored.timeouts,
        model_tokens=scored.model_tokens,
    )
    metrics = {
        "ranks/load_spread_before": load_spread(costs, before),
        "ranks/load_spread": load_spread(costs, partition),
    }
    return _rollout_to(mine, rollout.completion_ids.device), kept, metrics
