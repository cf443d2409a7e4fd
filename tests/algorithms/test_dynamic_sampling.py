"""DAPO's sampling fixes: dynamic sampling refills a batch of zero-spread groups from the sampler (whose
position, checkpointed, moves exactly by the extra draws), and the soft overlong penalty by hand."""

from __future__ import annotations

import pytest
import torch

from algorithms.advantages import overlong_penalty
from algorithms.dynamic_sampling import group_scores, informative_groups, refill_groups
from algorithms.grpo import GRPOConfig, build_grpo
from algorithms.rollout import Rollout
from conf.checks import ConfigError
from data.loading import PromptSampler
from rewards.combine import RewardOutput
from tests.conftest import say_rows, stage_context

G = 2


def fake_sample(batch, scores_of) -> tuple[Rollout, RewardOutput]:
    """A rollout of G samples per row without a model: prompt i is i + 1 tokens, completion j of it j + 1 tokens
    (so that draws differ in width), scored by scores_of(row)."""
    n = len(batch.rows) * G
    tp, tc = 1 + max(r["i"] for r in batch.rows), G
    prompt_mask = torch.stack([(torch.arange(tp) >= tp - 1 - r["i"]).long() for r in batch.rows for _ in range(G)])
    completion_mask = torch.stack([(torch.arange(tc) <= j).long() for _ in batch.rows for j in range(G)])
    rows = [r for r in batch.rows for _ in range(G)]
    rollout = Rollout(
        prompt_ids=prompt_mask * 7,
        prompt_mask=prompt_mask,
        completion_ids=completion_mask * 5,
        completion_mask=completion_mask,
        logp=-completion_mask.float(),
        truncated=torch.zeros(n).bool(),
        prompts=[f"p{r['i']}" for r in rows],
        completions=["c"] * n,
        rows=rows,
    )
    total = torch.tensor([s for r in batch.rows for s in scores_of(r)], dtype=torch.float32)
    return rollout, RewardOutput(total, {"accuracy": total.clone()}, {"accuracy": 1})


def test_informative_groups_by_hand():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert informative_groups(scores, 2).tolist() == [False, True, False]


def test_a_batch_of_equal_groups_is_refilled_from_the_sampler():
    # rows 0-3 score equally within their group (no signal); rows 4-7 do not
    rows = [{"i": i} for i in range(8)]
    scores_of = lambda r: [1.0, 1.0] if r["i"] < 4 else [0.0, 1.0]  # noqa: E731
    sampler = PromptSampler(rows, 2, seed=0)
    batch = sampler.draw()
    first = fake_sample(batch, scores_of)
    out = refill_groups(batch, first, lambda b: fake_sample(b, scores_of), G, max_draws=8, pad_id=0)
    kept_rows = [r["i"] for r in out.rollout.rows[::G]]
    assert len(kept_rows) == 2 and all(i >= 4 for i in kept_rows)  # two informative groups, nothing else
    assert informative_groups(out.scored.total, G).all()
    draws = int(out.cost.metrics["dynamic_sampling/extra_draws"]) + 1
    assert draws > 1 and out.cost.metrics["dynamic_sampling/prompts_drawn"] == 2 * draws
    # the sampler moved by exactly the draws made (the position a checkpoint stores), and every drawn group
    # without a spread was dropped
    reference = PromptSampler(rows, 2, seed=0)
    drawn = [r["i"] for _ in range(draws) for r in reference.draw().rows]
    assert sampler.state_dict() == reference.state_dict()
    assert out.cost.metrics["dynamic_sampling/groups_dropped"] == sum(i < 4 for i in drawn)
    assert out.cost.metrics["dynamic_sampling/filled_groups"] == 0
    # the rollout's tensors line up with its rows, padded to the widest draw
    assert out.rollout.prompt_ids.shape == (4, 1 + max(r["i"] for r in out.rollout.rows))
    assert out.rollout.prompt_mask.sum(1).tolist() == [1 + r["i"] for r in out.rollout.rows]
    assert out.scored.failures == {"accuracy": draws}  # every draw's failures are counted
    assert out.cost.generated_tokens == (len(drawn) - 2) * 3  # groups not trained on: 1 + 2 tokens each


def test_the_cap_on_draws_fills_the_batch_with_dropped_groups():
    rows = [{"i": i} for i in range(6)]
    sampler = PromptSampler(rows, 2, seed=1)
    batch = sampler.draw()
    equal = lambda r: [0.0, 0.0]  # noqa: E731
    out = refill_groups(batch, fake_sample(batch, equal), lambda b: fake_sample(b, equal), G, max_draws=1, pad_id=0)
    assert out.rollout.completion_mask.shape[0] == 4  # the batch keeps its size
    assert out.cost.metrics["dynamic_sampling/extra_draws"] == 1
    assert out.cost.metrics["dynamic_sampling/groups_dropped"] == 4
    assert out.cost.metrics["dynamic_sampling/filled_groups"] == 2
    assert sampler.state_dict()["position"] == 4


def test_grpo_with_dynamic_sampling_trains_on_informative_groups(tiny_model, tokenizer):
    from rewards import CombinedReward

    def half_signal(prompts, completions, **_):  # prompts 0 and 1 score 0 whatever the completion
        silent = ("something 0", "something 1")
        return [0.0 if any(s in p for s in silent) else len(c) / 100 for p, c in zip(prompts, completions)]

    reward = CombinedReward({"half": 1.0}, extra={"half": half_signal})
    cfg = GRPOConfig(
        dynamic_sampling=True, prompts_per_step=2, group_size=2, minibatch_size=4, micro_batch_size=4, max_new_tokens=6
    )
    built = build_grpo(stage_context(tiny_model, tokenizer, cfg, reward, train_rows=say_rows(tokenizer)))
    metrics = [built.algorithm.step(built.sampler.draw()).metrics for _ in range(2)]
    for m in metrics:
        assert m["tokens/generated"] >= m["tokens/trained"]  # dropped samples count as generated
        assert m["dynamic_sampling/prompts_drawn"] >= 2 and m["optimizer_steps"] == 1
    assert sum(m["dynamic_sampling/groups_dropped"] for m in metrics) > 0
    assert any(m["reward/zero_std_group_frac"] < 1.0 for m in metrics)


def test_dynamic_sampling_needs_groups():
    with pytest.raises(ConfigError, match=r"needs algo\.group_size >= 2"):
        GRPOConfig(dynamic_sampling=True, group_size=1)


@pytest.mark.parametrize("length, expected", [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (20, -1.0)])
def test_overlong_penalty_by_hand(length, expected):
    # max_new_tokens 16, buffer 4: free up to 12 tokens, then -1/4 per token, -1 at the limit; factor 0.5 halves it
    lengths = torch.tensor([length])
    assert overlong_penalty(lengths, 16, 4).item() == pytest.approx(expected)
    assert overlong_penalty(lengths, 16, 4, factor=0.5).item() == pytest.approx(expected / 2)
    assert overlong_penalty(lengths, 16, 0).item() == 0.0  # off


def test_overlong_penalty_enters_the_sequence_reward(tiny_model, tokenizer, letter_e_reward):
    cfg = GRPOConfig(
        overlong_buffer=4,
        overlong_penalty=0.5,
        prompts_per_step=2,
        group_size=2,
        minibatch_size=4,
        micro_batch_size=4,
        max_new_tokens=6,
    )
    built = build_grpo(stage_context(tiny_model, tokenizer, cfg, letter_e_reward, train_rows=say_rows(tokenizer)))
    rollout, scored = built.algorithm.sample_and_score(built.sampler.draw(), _timer())
    expected = overlong_penalty(rollout.completion_lengths, 6, 4, 0.5)
    torch.testing.assert_close(scored.parts["overlong"], expected)
    torch.testing.assert_close(scored.total, scored.parts["letter_e"] + expected)


def _timer():
    from training.timers import PhaseTimer

    return PhaseTimer()


def test_the_metric_picks_which_reward_decides_a_group():
    # the total differs within every group (a shaping term), the task reward only in the second group
    total = torch.tensor([0.1, 0.2, 0.3, 1.4])
    scored = RewardOutput(total, {"format_strict": torch.tensor([0.0, 0.0, 0.0, 1.0])}, {})
    assert informative_groups(group_scores(scored, "total"), 2).tolist() == [True, True]
    assert informative_groups(group_scores(scored, "format_strict"), 2).tolist() == [False, True]
    with pytest.raises(ValueError, match="choose one of: total, format_strict"):
        group_scores(scored, "acuracy")
