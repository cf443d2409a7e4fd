"""GAE: the vectorised backward loop against hand-computed cases and a plain per-sequence Python loop."""

from __future__ import annotations

import pytest
import torch

from algorithms.advantages import explained_variance, gae


def reference_gae(rewards: list[float], values: list[float], mask: list[int], gamma: float, lam: float):
    """The textbook recursion on one sequence's real tokens only; padding gets 0."""
    real = [t for t, m in enumerate(mask) if m]
    advantages, returns = [0.0] * len(mask), [0.0] * len(mask)
    next_value, last_gae = 0.0, 0.0
    for t in reversed(real):
        delta = rewards[t] + gamma * next_value - values[t]
        last_gae = delta + gamma * lam * last_gae
        advantages[t], returns[t] = last_gae, last_gae + values[t]
        next_value = values[t]
    return advantages, returns


def test_gamma_one_lambda_one_is_monte_carlo():
    # A_t = sum of rewards from t on - V_t; the row-2 padding holds garbage that must not leak in
    rewards = torch.tensor([[0.0, 0.0, 1.0], [1.0, 2.0, 1e6]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.0, 1.0, 1e6]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [3.0, 2.0, 0.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.5, 0.5], [3.0, 1.0, 0.0]]))


def test_gamma_half_lambda_half_by_hand():
    # t=2: delta = 2 - 1 = 1,               A = 1
    # t=1: delta = 0 + 0.5 * 1 - 2 = -1.5,  A = -1.5 + 0.25 * 1 = -1.25
    # t=0: delta = 1 + 0.5 * 2 - 1 = 1,     A = 1 + 0.25 * -1.25 = 0.6875
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.6875, -1.25, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.6875, 0.75, 2.0, 0.0]]))


def test_lambda_zero_is_one_step_td():
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.3, 0.6]])
    advantages, _ = gae(rewards, values, torch.ones(1, 2), gamma=0.9, lam=0.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.9 * 0.6 - 0.3, 1.0 - 0.6]]))


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0)])
@pytest.mark.parametrize("holes", [False, True])
def test_matches_python_loop_on_ragged_masks(gamma, lam, holes):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = torch.tensor([9, 1, 5, 3, 8, 2])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()  # completions: real up to EOS
    if holes:  # any mask at all: masked positions are skipped as if absent
        mask = (torch.rand(B, T, generator=g) < 0.6).long()
        mask[0] = 0  # a row with no real token
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        exp_adv, exp_ret = reference_gae(rewards[b].tolist(), values[b].tolist(), mask[b].tolist(), gamma, lam)
        torch.testing.assert_close(advantages[b], torch.tensor(exp_adv), msg=f"row {b}")
        torch.testing.assert_close(returns[b], torch.tensor(exp_ret), msg=f"row {b}")


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 7.0), returns, mask) == pytest.approx(0.0)
    assert torch.isnan(explained_variance(returns, torch.ones_like(returns), mask))
