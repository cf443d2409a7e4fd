"""Balancing data-parallel ranks: the equal-count partition against brute force and hand cases, and on a real
2-process gloo group the exchange of whole groups and an update whose gradient does not depend on the ranks."""

from __future__ import annotations

import itertools
import random
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from algorithms.common import rollout_tensors
from algorithms.dynamic_sampling import select_rollouts
from algorithms.rank_balance import balance_ranks, group_tokens
from algorithms.rollout import Rollout
from parallel.balance import equal_count_partition, load_spread
from parallel.distributed import sync_hooks
from rewards.combine import RewardOutput
from training.update import MicroBatch, OptimTarget, minibatch_update

WORLD = 2
G = 2
# completion lengths of each rank's 3 groups of G: rank 0 drew most of the long ones
LENGTHS = [[9, 8, 10, 7, 9, 9], [1, 2, 9, 9, 1, 1]]
TC = 10


def loads(costs: list[int], partition: list[list[int]]) -> list[int]:
    return [sum(costs[i] for i in part) for part in partition]


def test_equal_count_partition_by_hand():
    assert equal_count_partition([10, 1, 1, 10], 2) == [[0, 1], [2, 3]]
    # largest first gives loads 17 / 14 ({8, 5, 4} / {7, 6, 1}); swapping 8 for 7 narrows them to 16 / 15
    part = equal_count_partition([8, 7, 6, 5, 4, 1], 2)
    assert sorted(loads([8, 7, 6, 5, 4, 1], part)) == [15, 16]
    assert all(len(p) == 3 for p in part)
    assert load_spread([8, 7, 6, 5, 4, 1], part) == pytest.approx(16 / 15.5)
    assert load_spread([0, 0], [[0], [1]]) == 1.0
    with pytest.raises(ValueError, match="5 items do not split into 2 equal parts"):
        equal_count_partition([1] * 5, 2)


def _best_max_load(costs: list[int], parts: int) -> int:
    size, best = len(costs) // parts, [10**9]

    def assign(rest: list[int], worst: int) -> None:
        if not rest:
            best[0] = min(best[0], worst)
            return
        for others in itertools.combinations(rest[1:], size - 1):
            part = (rest[0], *others)
            assign([i for i in rest if i not in part], max(worst, sum(costs[i] for i in part)))

    assign(list(range(len(costs))), 0)
    return best[0]


def test_equal_count_partition_is_near_the_best_on_random_costs():
    for trial in range(200):
        rng = random.Random(trial)
        parts = rng.choice([2, 3])
        costs = [rng.randint(1, 100) for _ in range(parts * rng.choice([2, 3]))]
        partition = equal_count_partition(costs, parts)
        assert sorted(i for p in partition for i in p) == list(range(len(costs)))
        assert {len(p) for p in partition} == {len(costs) // parts}
        assert max(loads(costs, partition)) <= 1.1 * _best_max_load(costs, parts), (trial, costs)
        assert partition == equal_count_partition(costs, parts)  # every rank computes the same


def rank_rollout(rank: int) -> tuple[Rollout, RewardOutput]:
    """Rank `rank`'s 3 groups: a prompt of 2 + rank real tokens (left-padded to 3), completions of LENGTHS."""
    lengths = torch.tensor(LENGTHS[rank])
    n = len(lengths)
    prompt_mask = torch.zeros(n, 3, dtype=torch.long)
    prompt_mask[:, 1 - rank :] = 1
    completion_mask = (torch.arange(TC) < lengths[:, None]).long()
    ids = torch.arange(n)[:, None] + 100 * rank + 1
    rollout = Rollout(
        prompt_ids=ids.repeat(1, 3) * prompt_mask,
        prompt_mask=prompt_mask,
        completion_ids=ids.repeat(1, TC) * completion_mask,
        completion_mask=completion_mask,
        logp=-completion_mask.float(),
        truncated=lengths == TC,
        prompts=[f"prompt {rank}.{i // G}" for i in range(n)],
        completions=[f"completion {rank}.{i}" for i in range(n)],
        rows=[{"question": f"q {rank}.{i // G}"} for i in range(n)],
    )
    scored = RewardOutput(
        total=lengths.float(), parts={"length": lengths.float()}, failures={"length": rank}, timeouts={}
    )
    return rollout, scored


def _balanced(rank: int, init_file: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        rollout, scored, metrics = balance_ranks(*rank_rollout(rank), group_size=G, pad_id=0)
        results[rank] = {"rollout": rollout, "scored": scored, "metrics": metrics, "update": _update(rollout, rank)}
    finally:
        dist.destroy_process_group()


def features(rollout: Rollout) -> torch.Tensor:  # [N, Tc] a per-token input that tells the samples apart
    return rollout.completion_ids.float().sin() * rollout.completion_mask


def _update(rollout: Rollout, rank: int | None) -> dict[str, torch.Tensor]:
    """One optimiser step (SGD, lr 1) of a per-token linear loss over the batch, as dapo's token sum over the
    minibatch's tokens and as a token mean under a token budget; returns the weights it moved to."""
    out = {}
    for name in ("dapo", "token_mean"):
        weight = torch.nn.Parameter(torch.zeros(()))
        hooks = sync_hooks("ddp") if rank is not None else {}
        target = OptimTarget(torch.optim.SGD([weight], lr=1.0), [weight], 1e9, **hooks)
        batch = {**rollout_tensors(rollout), "x": features(rollout)}

        def loss_fn(micro, share, name=name, weight=weight):
            mask = micro["completion_mask"]
            token_loss = weight * micro["x"] * mask  # [n, Tc]
            if name == "dapo":
                loss = token_loss.sum() / share.minibatch_tokens
            else:
                loss = token_loss.sum() / mask.sum() * share.token_mean
            return loss, {"loss": loss.detach()}

        tokens = 12 if name == "token_mean" else 0
        minibatch_update(batch, loss_fn, [target], 1, len(rollout.prompts), MicroBatch(2, tokens=tokens), shuffle=False)
        out[name] = weight.detach().clone()
    return out


def test_balance_moves_whole_groups_to_equal_counts_and_the_update_does_not_depend_on_the_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_balanced, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    before = [rank_rollout(r)[0] for r in range(WORLD)]
    after = [results[r]["rollout"] for r in range(WORLD)]
    # every sample once, each rank 3 whole groups, rows and scores travelled with their samples
    assert sorted(c for r in after for c in r.completions) == sorted(c for r in before for c in r.completions)
    for r in range(WORLD):
        rollout, scored = after[r], results[r]["scored"]
        assert len(rollout.completions) == 3 * G
        for g in range(3):
            group = slice(g * G, (g + 1) * G)
            assert len(set(rollout.prompts[group])) == 1
            assert len({row["question"] for row in rollout.rows[group]}) == 1
        torch.testing.assert_close(scored.total, rollout.completion_mask.sum(-1).float())
        torch.testing.assert_close(scored.parts["length"], scored.total)
        assert scored.failures == {"length": r}  # counted where the scoring ran
        # padding follows the new batch: prompts left-padded, completions right-padded
        assert rollout.prompt_mask[:, -1].all() and rollout.completion_mask[:, 0].all()
        source = int(rollout.prompts[0].split()[1].split(".")[0])
        i = before[source].completions.index(rollout.completions[0])
        prompt = before[source].prompt_ids[i][before[source].prompt_mask[i].bool()]
        assert torch.equal(rollout.prompt_ids[0][rollout.prompt_mask[0].bool()], prompt)
    tokens = [sum(group_tokens(r, G)) for r in after]
    tokens_before = [sum(group_tokens(r, G)) for r in before]
    assert tokens_before == [58, 32] and tokens == [45, 45]  # group tokens 19 19 20 | 6 21 5
    metrics = results[0]["metrics"]
    assert metrics == results[1]["metrics"]
    assert metrics["ranks/load_spread_before"] == pytest.approx(max(tokens_before) / (sum(tokens_before) / 2))
    assert metrics["ranks/load_spread"] == pytest.approx(max(tokens) / (sum(tokens) / 2))
    # the step of one process on the whole batch: the token means are the global ones on either rank
    whole = rollout_from(before)
    one = _update(whole, None)
    for r in range(WORLD):
        for name, weight in results[r]["update"].items():
            torch.testing.assert_close(weight, one[name], msg=name)
            assert weight != 0


def rollout_from(parts: list[Rollout]) -> Rollout:
    return select_rollouts([(p, torch.arange(len(p.prompts))) for p in parts], pad_id=0)
