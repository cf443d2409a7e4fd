"""Compute accounting: token counts per model and FLOPs, checked against hand-counted rollouts."""

from __future__ import annotations

import torch

from algorithms.compute import model_params, step_compute_metrics
from algorithms.rollout import Rollout
from rewards.combine import CombinedReward
from training.accounting import accumulate_totals


def hand_rollout() -> Rollout:
    # two samples: 3 + 2 real prompt tokens (left-padded to 3), 4 + 1 real completion tokens
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    zeros = torch.zeros(2, 4)
    return Rollout(
        prompt_ids=prompt_mask.clone(),
        prompt_mask=prompt_mask,
        completion_ids=completion_mask.clone(),
        completion_mask=completion_mask,
        logp=zeros,
        truncated=torch.tensor([True, False]),
        prompts=["a", "b"],
        completions=["x", "y"],
        rows=[{}, {}],
    )


def test_grpo_step_counts_by_hand():
    # prompt 5, generated 5, sequence 10; actor: 5 + 5 (generation) + 2 epochs * 10 = 30 forward, 20 backward
    params = {"actor": 100, "reference": 100, "critic": 0, "reward_model": 0}
    m = step_compute_metrics(hand_rollout(), 0, params, epochs=2, old_logp_pass=False)
    assert m["compute/actor_forward_tokens"] == 30 and m["compute/actor_backward_tokens"] == 20
    assert m["compute/reference_forward_tokens"] == 10
    assert m["compute/critic_forward_tokens"] == 0 and m["compute/critic_backward_tokens"] == 0
    assert m["compute/flops"] == 2 * 100 * 30 + 4 * 100 * 20 + 2 * 100 * 10  # 18000
    assert m["tokens/prompt"] == 5 and m["tokens/trained"] == 10


def test_ppo_step_counts_critic_reward_model_and_old_logp_pass():
    params = {"actor": 10, "reference": 0, "critic": 20, "reward_model": 30}
    m = step_compute_metrics(hand_rollout(), 7, params, epochs=1, old_logp_pass=True)
    # actor: generation 10 + old-logp pass 10 + 1 epoch 10; critic: old values 10 + 1 epoch 10
    assert m["compute/actor_forward_tokens"] == 30 and m["compute/actor_backward_tokens"] == 10
    assert m["compute/reference_forward_tokens"] == 0
    assert m["compute/critic_forward_tokens"] == 20 and m["compute/critic_backward_tokens"] == 10
    assert m["compute/reward_model_forward_tokens"] == 7
    assert m["compute/flops"] == (2 * 10 * 30 + 4 * 10 * 10) + (2 * 20 * 20 + 4 * 20 * 10) + 2 * 30 * 7


def test_totals_accumulate_step_metrics_only():
    totals = {"time/total": 3.0}
    accumulate_totals(
        totals,
        {
            "tokens/generated": 5.0,
            "compute/flops": 2.0,
            "compute/pass_padding_frac": 0.25,  # a share: no total
            "time/train": 1.5,
            "time/step": 9.0,
            "reward/total_mean": 0.3,
        },
    )
    accumulate_totals(totals, {"tokens/generated": 7.0, "compute/flops": 4.0, "time/train": 0.5})
    assert totals == {
        "time/total": 3.0,
        "tokens/generated_total": 12.0,
        "compute/flops_total": 6.0,
        "time/train_total": 2.0,
    }


class CountingScorer:
    """A learned-model-like reward: counts the tokens it forwards, as RewardModelScorer does."""

    num_params = 1234

    def __init__(self) -> None:
        self.forward_tokens = 0

    def __call__(self, prompts, completions, **_):
        self.forward_tokens += sum(len(p) + len(c) for p, c in zip(prompts, completions))
        return [float(len(c)) for c in completions]


def test_combined_reward_reports_model_tokens_and_params(tiny_model):
    reward = CombinedReward({"reward_model": 1.0, "format": 0.0}, extra={"reward_model": CountingScorer()})
    out = reward(["ab", "c"], ["xyz", ""], [{}, {}])
    assert out.model_tokens == {"reward_model": 6}
    assert reward.model_params() == {"reward_model": 1234}
    params = model_params(tiny_model, reward_fn=reward)
    assert params["reward_model"] == 1234 and params["reference"] == 0 and params["critic"] == 0
    assert params["actor"] == sum(p.numel() for p in tiny_model.parameters()) > 0
