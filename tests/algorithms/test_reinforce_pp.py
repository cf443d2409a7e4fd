"""REINFORCE++: per-token rewards and returns by hand and against loops, its config checks, and that it learns."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from algorithms.advantages import gae, kl_penalised_token_rewards
from algorithms.reinforce_pp import ReinforcePPConfig, build_reinforce_pp, discounted_returns
from conf.checks import ConfigError
from tests.conftest import learn


def token_rewards_reference(scores, kl, mask, beta) -> list[list[float]]:
    """The definition, one token at a time: -beta * KL on real tokens, + the score on the last real one."""
    out = []
    for i in range(len(scores)):
        real = [t for t in range(len(mask[i])) if mask[i][t]]
        row = [-beta * kl[i][t] if mask[i][t] else 0.0 for t in range(len(mask[i]))]
        if real:
            row[real[-1]] += scores[i]
        out.append(row)
    return out


def returns_reference(rewards, mask, gamma) -> list[list[float]]:
    """G_t = r_t + gamma * G_next over the real tokens, from the end; padding gets 0 and is skipped."""
    out = []
    for r_row, m_row in zip(rewards, mask):
        running, row = 0.0, [0.0] * len(r_row)
        for t in reversed(range(len(r_row))):
            if m_row[t]:
                running = r_row[t] + gamma * running
                row[t] = running
        out.append(row)
    return out


def random_inputs(seed: int, n: int = 6, t: int = 9):
    g = torch.Generator().manual_seed(seed)
    scores, kl = torch.randn(n, generator=g), torch.randn(n, t, generator=g)
    lengths = torch.randint(0, t + 1, (n,), generator=g)  # right-padded, one row may be empty
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return scores, kl, mask


# ---- the estimator ----------------------------------------------------------------------------------
def test_token_rewards_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.7, 9.0], [9.0, 9.0, 9.0]])  # the 9s are padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    # row 0: -0.5 * [0.1, 0.2, 0.3] + [0, 0, 1] = [-0.05, -0.1, 0.85]
    # row 1: -0.5 * [0.5, 0.7] + [0, 2] = [-0.25, 1.65], padding 0
    # row 2: no real token, nothing to reward
    expected = torch.tensor([[-0.05, -0.1, 0.85], [-0.25, 1.65, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(kl_penalised_token_rewards(scores, kl, mask, beta=0.5), expected)


def test_returns_by_hand():
    rewards = torch.tensor([[-0.05, -0.1, 0.85], [-0.25, 1.65, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # gamma = 1, a reverse cumulative sum: [0.7, 0.75, 0.85]; [1.4, 1.65, 0 (padding)]
    torch.testing.assert_close(
        discounted_returns(rewards, mask, 1.0), torch.tensor([[0.7, 0.75, 0.85], [1.4, 1.65, 0.0]])
    )
    # gamma = 0.5 on [1, 2, 3, pad]: G2 = 3, G1 = 2 + 1.5 = 3.5, G0 = 1 + 1.75 = 2.75
    torch.testing.assert_close(
        discounted_returns(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1, 1, 1, 0]]), 0.5),
        torch.tensor([[2.75, 3.5, 3.0, 0.0]]),
    )
    # a masked position inside a row is skipped: [1, (5), 2] -> G2 = 2, G0 = 1 + 0.5 * 2 = 2
    torch.testing.assert_close(
        discounted_returns(torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([[1, 0, 1]]), 0.5),
        torch.tensor([[2.0, 0.0, 2.0]]),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_rewards_match_the_loop_on_random_inputs(seed):
    scores, kl, mask = random_inputs(seed)
    expected = token_rewards_reference(scores.tolist(), kl.tolist(), mask.tolist(), 0.3)
    torch.testing.assert_close(kl_penalised_token_rewards(scores, kl, mask, 0.3), torch.tensor(expected))


@pytest.mark.parametrize("seed, gamma", [(0, 1.0), (1, 0.9), (2, 0.0)])
def test_returns_match_the_loop_and_gae_with_a_zero_critic(seed, gamma):
    _, rewards, mask = random_inputs(seed)
    mask[0, 2] = 0  # and a hole inside a row
    got = discounted_returns(rewards, mask, gamma)
    torch.testing.assert_close(got, torch.tensor(returns_reference(rewards.tolist(), mask.tolist(), gamma)))
    assert (got[mask == 0] == 0).all()  # masked positions get 0
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)
    torch.testing.assert_close(got, advantages)  # REINFORCE++'s returns = GAE with V = 0 and lam = 1


# ---- the config -------------------------------------------------------------------------------------
def test_group_mean_baseline_needs_two_samples_per_prompt():
    with pytest.raises(ConfigError, match=r"algo.baseline=group_mean with algo.group_size=1.*>= 2"):
        ReinforcePPConfig(baseline="group_mean", prompts_per_step=8, group_size=1)
    ReinforcePPConfig(baseline="group_mean")  # the defaults: 2 prompts x 4 samples
    with pytest.raises(ConfigError, match="choose one of: none, group_mean"):
        ReinforcePPConfig(baseline="critic")


def test_reinforce_pp_defaults_spend_grpos_budget():
    cfg = ReinforcePPConfig()
    assert (cfg.prompts_per_step * cfg.group_size, cfg.max_new_tokens) == (8, 40)
    assert (cfg.baseline, cfg.loss_type, cfg.kl_estimator, cfg.gamma, cfg.whiten_advantages) == (
        "none",
        "bnpo",
        "k1",
        1.0,
        True,
    )


# ---- it learns ----------------------------------------------------------------------------------------
def train_reinforce_pp(model, tokenizer, reward, steps: int, beta: float, seed: int = 0, **options) -> list[dict]:
    # 4 prompts x 8 samples, as GRPO's learning test (the default baseline, none, ignores the groups)
    cfg = ReinforcePPConfig(
        prompts_per_step=4,
        group_size=8,
        minibatch_size=16,
        micro_batch_size=16,
        max_new_tokens=12,
        beta=beta,
        num_iterations=2,
        **options,
    )
    return learn(build_reinforce_pp, cfg, model, tokenizer, reward, steps, seed)


def test_reinforce_pp_raises_reward_on_synthetic_task(tiny_model, tokenizer, letter_e_reward):
    # beta = 0, as GRPO's learning test: at this learning rate a KL pull holds the random policy in place
    metrics = train_reinforce_pp(tiny_model, tokenizer, letter_e_reward, steps=25, beta=0.0)
    rewards = [m["reward/total_mean"] for m in metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, f"reward did not rise: first {first:.3f}, last {last:.3f}: {rewards}"


def test_reinforce_pp_learning_is_deterministic_and_logs_the_kl(tiny_model, tokenizer, letter_e_reward):
    twin = copy.deepcopy(tiny_model)

    def run(model):
        return train_reinforce_pp(model, tokenizer, letter_e_reward, steps=3, beta=0.02, baseline="group_mean")

    first = run(tiny_model)
    assert [m["reward/total_mean"] for m in first] == [m["reward/total_mean"] for m in run(twin)]
    for m in first:
        for key in (
            "kl",
            "kl/sequence",
            "reward/kl_penalty_mean",
            "advantages/std",
            "returns/mean",
            "reward/zero_std_group_frac",
            "approx_kl",
            "clip_frac",
            "entropy",
        ):
            assert math.isfinite(m[key]), (key, m[key])
        assert m["reward/kl_penalty_mean"] == pytest.approx(-0.02 * m["kl/sequence"], rel=1e-4, abs=1e-7)
