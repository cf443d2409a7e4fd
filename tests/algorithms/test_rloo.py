"""RLOO: the leave-one-out estimator by hand and against a loop, its config checks, and that it learns."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from algorithms.rloo import RLOOConfig, build_rloo, kl_penalised_rewards, leave_one_out_advantages
from conf.checks import ConfigError
from tests.conftest import learn


def loo_reference(rewards: list[float], group_size: int) -> list[float]:
    """The definition, one sample at a time: r_i minus the mean of the other samples of its prompt."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            out.append(r - sum(others) / len(others))
    return out


# ---- the estimator ----------------------------------------------------------------------------------
def test_leave_one_out_by_hand():
    # group 1: [1, 2, 3, 6], sum 12: baselines 11/3, 10/3, 9/3, 6/3 -> -8/3, -4/3, 0, 4
    #          (= 4/3 * (r - 3), G / (G - 1) times the centred reward)
    # group 2: [5, 5, 5, 5]: every baseline 5 -> 0
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    expected = torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(leave_one_out_advantages(rewards, 4), expected)
    # G = 2: each sample's baseline is the other one: [1, 3] -> [-2, 2]
    torch.testing.assert_close(leave_one_out_advantages(torch.tensor([1.0, 3.0]), 2), torch.tensor([-2.0, 2.0]))


@pytest.mark.parametrize("group_size", [2, 3, 4, 8])
def test_leave_one_out_matches_the_loop_on_random_rewards(group_size):
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.randn(5 * group_size, generator=g)
    got = leave_one_out_advantages(rewards, group_size)
    torch.testing.assert_close(got, torch.tensor(loo_reference(rewards.tolist(), group_size)))
    # the closed form and the zero sum of each group
    grouped = rewards.view(-1, group_size)
    scaled = group_size / (group_size - 1) * (grouped - grouped.mean(1, keepdim=True))
    torch.testing.assert_close(got, scaled.flatten())
    torch.testing.assert_close(got.view(-1, group_size).sum(1), torch.zeros(5), atol=1e-5, rtol=0)


def test_leave_one_out_rejects_bad_groups():
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="do not split"):
        leave_one_out_advantages(torch.ones(6), 4)


def test_kl_penalised_rewards_by_hand_and_padding_counts_nothing():
    scores = torch.tensor([1.0, 0.5])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0]])  # the 9s are padding
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # 1 - 0.5 * (0.1 + 0.2 + 0.3) = 0.7;  0.5 - 0.5 * 0.4 = 0.3
    torch.testing.assert_close(kl_penalised_rewards(scores, kl, mask, beta=0.5), torch.tensor([0.7, 0.3]))
    torch.testing.assert_close(kl_penalised_rewards(scores, kl, mask, beta=0.0), scores)


def test_kl_penalised_rewards_match_the_loop_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    scores, kl = torch.randn(6, generator=g), torch.randn(6, 7, generator=g)
    mask = (torch.rand(6, 7, generator=g) > 0.3).long()
    beta = 0.3
    expected = [scores[i].item() - beta * sum(kl[i, t].item() for t in range(7) if mask[i, t]) for i in range(6)]
    torch.testing.assert_close(kl_penalised_rewards(scores, kl, mask, beta), torch.tensor(expected))


# ---- the config -------------------------------------------------------------------------------------
def test_rloo_needs_two_samples_per_prompt():
    with pytest.raises(ConfigError, match=r"algo.group_size=1.*choose algo.group_size >= 2"):
        RLOOConfig(group_size=1)
    RLOOConfig(group_size=2)


def test_rloo_defaults_spend_grpos_budget():
    cfg = RLOOConfig()
    assert (cfg.prompts_per_step * cfg.group_size, cfg.max_new_tokens) == (8, 40)
    assert (cfg.loss_type, cfg.kl_estimator, cfg.whiten_advantages) == ("bnpo", "k1", False)


# ---- it learns ----------------------------------------------------------------------------------------
def train_rloo(model, tokenizer, reward, steps: int, beta: float, seed: int = 0, **options) -> list[dict]:
    cfg = RLOOConfig(
        prompts_per_step=4,
        group_size=8,
        minibatch_size=16,
        micro_batch_size=16,
        max_new_tokens=12,
        beta=beta,
        num_iterations=2,
        **options,
    )
    return learn(build_rloo, cfg, model, tokenizer, reward, steps, seed)


def test_rloo_raises_reward_on_synthetic_task(tiny_model, tokenizer, letter_e_reward):
    # beta = 0, as GRPO's learning test: at this learning rate a KL pull holds the random policy in place
    metrics = train_rloo(tiny_model, tokenizer, letter_e_reward, steps=25, beta=0.0)
    rewards = [m["reward/total_mean"] for m in metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, f"reward did not rise: first {first:.3f}, last {last:.3f}: {rewards}"
    for m in metrics:
        assert abs(m["advantages/mean"]) < 1e-5  # every group's leave-one-out advantages sum to 0


def test_rloo_learning_is_deterministic_and_logs_the_kl(tiny_model, tokenizer, letter_e_reward):
    twin = copy.deepcopy(tiny_model)

    def run(model):
        return train_rloo(model, tokenizer, letter_e_reward, steps=3, beta=0.02, whiten_advantages=True)

    first = run(tiny_model)
    assert [m["reward/total_mean"] for m in first] == [m["reward/total_mean"] for m in run(twin)]
    for m in first:
        for key in (
            "kl",
            "kl/sequence",
            "reward/kl_penalty_mean",
            "advantages/std",
            "advantages/abs_mean",
            "reward/zero_std_group_frac",
            "approx_kl",
            "clip_frac",
            "entropy",
        ):
            assert math.isfinite(m[key]), (key, m[key])
        # the penalty is -beta times the summed k1
        assert m["reward/kl_penalty_mean"] == pytest.approx(-0.02 * m["kl/sequence"], rel=1e-4, abs=1e-7)
