"""Group-relative advantages, masked statistics and whitening against hand values and loop references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from algorithms.advantages import group_advantages, masked_mean, masked_var, whiten

EPS = 1e-4


def reference_group_advantages(rewards: list[float], group_size: int, scale: str, eps: float = EPS) -> list[float]:
    """Plain-Python definition: (r - group mean) / (unbiased std + eps), std of the group or of the batch."""
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        if scale == "group":
            std = statistics.stdev(group) if len(group) > 1 else 0.0
        elif scale == "batch":
            std = batch_std
        for r in group:
            out.append((r - mean) / (std + eps) if scale != "none" else r - mean)
    return out


# ---------------------------------------------------------------- group_advantages


def test_group_advantages_hand_computed_group_scale():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]: sum of squares 1, over n - 1 = 3
    a = 0.5 / (std + EPS)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=1e-6)
    assert not torch.isnan(adv).any()
    assert adv.shape == rewards.shape


def test_group_advantages_constant_group_is_zero_not_nan():
    adv = group_advantages(torch.full((6,), 3.0), group_size=3)
    assert torch.equal(adv, torch.zeros(6))


def test_group_advantages_hand_computed_batch_and_none_scale():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])
    none = group_advantages(rewards, group_size=2, scale="none")
    torch.testing.assert_close(none, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    batch = group_advantages(rewards, group_size=2, scale="batch")
    std = statistics.stdev([1.0, 0.0, 3.0, 3.0])  # the whole batch's spread, not a group's
    torch.testing.assert_close(batch, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (std + EPS))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size,num_groups", [(2, 1), (4, 3), (8, 5), (3, 7)])
def test_group_advantages_match_python_loop_reference_on_random_rewards(scale, group_size, num_groups):
    gen = torch.Generator().manual_seed(group_size * 100 + num_groups)
    rewards = torch.randn(group_size * num_groups, generator=gen, dtype=torch.float64)
    # include a few exactly tied groups and binary rewards, the common case in RL from verifiers
    if num_groups > 2:
        rewards[:group_size] = 1.0
        rewards[group_size : 2 * group_size] = torch.randint(0, 2, (group_size,), generator=gen).double()
    adv = group_advantages(rewards, group_size, scale=scale)
    expected = torch.tensor(reference_group_advantages(rewards.tolist(), group_size, scale), dtype=adv.dtype)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    assert not torch.isnan(adv).any()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_each_group_sums_to_zero(scale):
    rewards = torch.rand(24, generator=torch.Generator().manual_seed(0))
    adv = group_advantages(rewards, group_size=6, scale=scale).view(4, 6)
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(4), atol=1e-5, rtol=0)


def test_group_advantages_group_scale_gives_unit_unbiased_std_per_group():
    rewards = torch.randn(5 * 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 7 + 3
    adv = group_advantages(rewards, group_size=8, scale="group", eps=0.0).view(5, 8)
    torch.testing.assert_close(adv.std(dim=1).double(), torch.ones(5, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_group_size_one_gives_zeros_without_nan(scale):
    adv = group_advantages(torch.tensor([0.3, 1.0, -2.0]), group_size=1, scale=scale)
    assert torch.equal(adv, torch.zeros(3))


def test_group_advantages_single_reward_batch_scale_is_zero():
    adv = group_advantages(torch.tensor([5.0]), group_size=1, scale="batch")
    assert torch.equal(adv, torch.zeros(1))


def test_group_advantages_rejects_reward_count_not_divisible_by_group_size():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(10), group_size=4)


def test_group_advantages_rejects_unknown_scale_naming_the_choices():
    with pytest.raises(ValueError) as err:
        group_advantages(torch.zeros(4), group_size=2, scale="std")
    for choice in ("group", "batch", "none"):
        assert choice in str(err.value)


def test_group_advantages_returns_float_for_integer_rewards():
    adv = group_advantages(torch.tensor([1, 0, 0, 1]), group_size=2, scale="none")
    assert adv.is_floating_point()
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_group_advantages_does_not_modify_input():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    before = rewards.clone()
    group_advantages(rewards, group_size=2)
    assert torch.equal(rewards, before)


# ---------------------------------------------------------------- masked_mean / masked_var


def test_masked_mean_over_all_and_along_a_dim():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, -50.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(13.0 / 4))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 5.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=0), torch.tensor([2.5, 2.0, 6.0]))


def test_masked_mean_all_zero_mask_row_gives_zero():
    x = torch.tensor([[1.0, 2.0], [float(7), 9.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    out = masked_mean(x, mask, dim=1)
    torch.testing.assert_close(out, torch.tensor([1.5, 0.0]))
    assert masked_mean(x, torch.zeros_like(mask)) == 0


def test_masked_var_matches_unbiased_and_biased_variance_of_real_entries():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    mask = (torch.rand(4, 9, generator=gen) > 0.4).double()
    real = x[mask.bool()]
    torch.testing.assert_close(masked_var(x, mask), real.var(unbiased=True))
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), real.var(unbiased=False))


# ---------------------------------------------------------------- whiten


def ragged_mask(lengths: list[int], T: int) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()


def test_whiten_gives_zero_mean_unit_unbiased_variance_over_real_entries():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 11, generator=gen, dtype=torch.float64) * 4 + 2.5
    mask = ragged_mask([11, 1, 6, 3, 9], 11)
    out = whiten(x, mask)
    real = out[mask.bool()]
    torch.testing.assert_close(real.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(real.var(unbiased=True), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)


def test_whiten_zeroes_padding_positions():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)) + 10.0
    mask = ragged_mask([6, 2, 4], 6)
    out = whiten(x, mask)
    assert (out[~mask.bool()] == 0).all()
    assert not (out[mask.bool()] == 0).any()


def test_whiten_ignores_padding_values():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = ragged_mask([6, 2, 4], 6)
    garbage = x.clone()
    garbage[~mask.bool()] = 1e6
    torch.testing.assert_close(whiten(garbage, mask), whiten(x, mask))


def test_whiten_without_shift_keeps_the_mean():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, generator=gen, dtype=torch.float64) * 3 + 5.0
    mask = ragged_mask([8, 5, 1, 7], 8)
    out = whiten(x, mask, shift_mean=False)
    real_in, real_out = x[mask.bool()], out[mask.bool()]
    torch.testing.assert_close(real_out.mean(), real_in.mean())
    torch.testing.assert_close(real_out.var(unbiased=True), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (out[~mask.bool()] == 0).all()


def test_whiten_matches_loop_reference():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    mask = ragged_mask([5, 3, 2], 5)
    real = [x[i, j].item() for i in range(3) for j in range(5) if mask[i, j]]
    mean, std = statistics.fmean(real), statistics.stdev(real)
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(5):
            if mask[i, j]:
                expected[i, j] = (x[i, j].item() - mean) / std
    torch.testing.assert_close(whiten(x, mask), expected, atol=1e-7, rtol=1e-7)
