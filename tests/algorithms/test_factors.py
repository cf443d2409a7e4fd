"""The PPO-GRPO grid: group baselines in place of PPO's critic, and the KL in the reward or the loss for
every algorithm. The estimators by hand and against GRPO's and RLOO's; the options on the tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from algorithms.advantages import (
    group_advantages,
    group_baseline,
    group_baselined_returns,
    group_scale,
    kl_penalised_token_rewards,
    sequence_returns,
)
from algorithms.grpo import GRPOConfig, build_grpo
from algorithms.ppo import PPOConfig, build_ppo
from algorithms.rloo import leave_one_out_advantages
from conf.checks import ConfigError
from conf.registry import get_stage
from tests.conftest import learn, say_rows, stage_context

SMALL = dict(prompts_per_step=2, group_size=2, minibatch_size=4, micro_batch_size=4, max_new_tokens=6)


# ---- the estimators ---------------------------------------------------------------------------------
def test_group_baseline_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])  # G = 2: groups [1, 2], [3, 6]
    torch.testing.assert_close(group_baseline(rewards, 2, "group_mean"), torch.tensor([1.5, 1.5, 4.5, 4.5]))
    torch.testing.assert_close(group_baseline(rewards, 2, "leave_one_out"), torch.tensor([2.0, 1.0, 6.0, 3.0]))
    with pytest.raises(ValueError, match="choose one of: group_mean, leave_one_out"):
        group_baseline(rewards, 2, "critic")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_are_baseline_over_scale(scale):
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(0))
    split = (rewards - group_baseline(rewards, 4)) / group_scale(rewards, 4, scale)
    torch.testing.assert_close(split, group_advantages(rewards, 4, scale))
    loo = rewards - group_baseline(rewards, 4, "leave_one_out")
    torch.testing.assert_close(loo, leave_one_out_advantages(rewards, 4))


def test_group_baselined_returns_by_hand():
    # G = 2, one prompt. Row 0: tokens KL 0.1, 0.3, score 1; row 1: KL 0.2 and padding, score 0; beta 1.
    scores, beta = torch.tensor([1.0, 0.0]), 1.0
    kl = torch.tensor([[0.1, 0.3], [0.2, 9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    token_rewards = kl_penalised_token_rewards(scores, kl, mask, beta)  # [[-0.1, 0.7], [-0.2, 0]]
    advantages, returns = group_baselined_returns(token_rewards, mask, 2, "group_mean")
    sequence = sequence_returns(returns, mask)
    # returns-to-go [[0.6, 0.7], [-0.2, 0]]; sequence returns 0.6, -0.2; group mean 0.2
    torch.testing.assert_close(sequence, torch.tensor([0.6, -0.2]))
    torch.testing.assert_close(advantages, torch.tensor([[0.4, 0.5], [-0.4, 0.0]]))
    loo, _ = group_baselined_returns(token_rewards, mask, 2, "leave_one_out")  # baselines -0.2, 0.6
    torch.testing.assert_close(loo, torch.tensor([[0.8, 0.9], [-0.8, 0.0]]))


def test_without_kl_the_group_baseline_is_dr_grpo_on_every_token():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]])
    token_rewards = kl_penalised_token_rewards(scores, torch.zeros(6, 3), mask, 0.0)
    advantages, _ = group_baselined_returns(token_rewards, mask, 3)
    expected = group_advantages(scores, 3, "none")[:, None] * mask
    torch.testing.assert_close(advantages, expected)


# ---- the options on the tiny Llama -------------------------------------------------------------------
@pytest.mark.parametrize("baseline", ["group_mean", "leave_one_out"])
def test_ppo_with_a_group_baseline_builds_and_trains_no_critic(baseline, tiny_model, tokenizer, letter_e_reward):
    cfg = PPOConfig(baseline=baseline, **SMALL)
    built = build_ppo(stage_context(tiny_model, tokenizer, cfg, letter_e_reward, train_rows=say_rows(tokenizer)))
    ppo = built.algorithm
    assert ppo.critic is None and ppo.params["critic"] == 0 and ppo.checkpoint_models() == {}
    assert list(built.optimizers) == ["actor"] and len(ppo.targets) == 1
    assert get_stage("ppo").kept_models(cfg) == ("reference",)  # what the memory projection counts
    assert get_stage("ppo").kept_models(PPOConfig()) == get_stage("ppo").models == ("reference", "critic")
    metrics = ppo.step(built.sampler.draw()).metrics
    assert "value_loss" not in metrics and "explained_var" not in metrics
    assert metrics["compute/critic_forward_tokens"] == 0 and metrics["optimizer_steps"] == 1
    assert "kl/sequence" in metrics and torch.isfinite(torch.tensor(metrics["loss"]))


def test_kl_in_the_loss_for_ppo_and_in_the_reward_for_grpo(tiny_model, tokenizer, letter_e_reward):
    ppo = learn(build_ppo, PPOConfig(kl_in="loss", **SMALL), tiny_model, tokenizer, letter_e_reward, steps=2)
    assert "reward/kl_penalty_mean" not in ppo[-1] and "kl" in ppo[-1] and "value_loss" in ppo[-1]
    grpo = learn(build_grpo, GRPOConfig(kl_in="reward", **SMALL), tiny_model, tokenizer, letter_e_reward, steps=2)
    assert "reward/kl_penalty_mean" in grpo[-1] and "kl/sequence" in grpo[-1]


def test_kl_in_the_reward_changes_grpo_only_by_the_penalty(tiny_model, tokenizer, letter_e_reward):
    """With beta = 0 there is no reference: kl_in=reward is plain GRPO, step for step."""
    fresh = copy.deepcopy(tiny_model)
    a = learn(build_grpo, GRPOConfig(beta=0.0, **SMALL), tiny_model, tokenizer, letter_e_reward, steps=1)
    b = learn(build_grpo, GRPOConfig(beta=0.0, kl_in="reward", **SMALL), fresh, tokenizer, letter_e_reward, steps=1)
    for key in ("reward/total_mean", "advantages/abs_mean", "loss"):
        assert a[0][key] == pytest.approx(b[0][key], abs=1e-6), key


def test_bad_factor_options_name_the_choices():
    with pytest.raises(ConfigError, match="choose one of: critic, group_mean, leave_one_out"):
        PPOConfig(baseline="mean")
    with pytest.raises(ConfigError, match=r"needs algo\.group_size >= 2"):
        PPOConfig(baseline="group_mean", group_size=1)
    with pytest.raises(ConfigError, match="choose one of: loss, reward"):
        GRPOConfig(kl_in="advantage")
