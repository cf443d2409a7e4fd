"""Rollout correction: the weights of each mode by hand, the mismatch metrics, and that a run with each mode
keeps the sampling-time log-probs beside the recomputed ones and logs the mismatch."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.grpo import GRPOConfig, build_grpo
from algorithms.rollout_correction import ROLLOUT_CORRECTIONS, rollout_correction
from conf.checks import ConfigError
from tests.conftest import say_rows, stage_context

# rho = pi_trainer / pi_sampler per token: row 0 (0.4, 1.0, 3.0), row 1 (1.25, 0.8, padding)
RHO = torch.tensor([[0.4, 1.0, 3.0], [1.25, 0.8, 1.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
SAMPLER = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.4, 0.5, 0.3]], dtype=torch.float64))
TRAINER = SAMPLER + torch.log(RHO)


def weights(mode: str, **kwargs) -> torch.Tensor:
    return rollout_correction(TRAINER, SAMPLER, MASK, mode, **kwargs)[0]


def test_weights_of_each_mode_by_hand():
    band = {"cap": 2.0, "low": 0.5, "high": 2.0}
    torch.testing.assert_close(weights("none", **band), MASK.double())
    # tis: min(rho, 2)
    torch.testing.assert_close(weights("tis", **band), torch.tensor([[0.4, 1.0, 2.0], [1.25, 0.8, 0.0]]).double())
    # mis: rho inside [0.5, 2], else 0
    torch.testing.assert_close(weights("mis", **band), torch.tensor([[0.0, 1.0, 0.0], [1.25, 0.8, 0.0]]).double())
    # seq_mis: row 0's geometric mean (0.4 * 1 * 3)^(1/3) = 1.063 is inside the band, row 1's (1.25 * 0.8)^(1/2) = 1
    torch.testing.assert_close(weights("seq_mis", **band), weights("tis", **band))
    # a narrower band drops row 0 whole (1.063 > 1.05) and keeps row 1 (exactly 1)
    narrow = weights("seq_mis", cap=2.0, low=0.95, high=1.05)
    torch.testing.assert_close(narrow, torch.tensor([[0.0, 0.0, 0.0], [1.25, 0.8, 0.0]]).double())


def test_mismatch_metrics_by_hand():
    _, metrics = rollout_correction(TRAINER, SAMPLER, MASK, "mis", cap=2.0, low=0.5, high=2.0)
    real = [0.4, 1.0, 3.0, 1.25, 0.8]
    assert metrics["rollout_corr/ratio_mean"] == pytest.approx(sum(real) / 5)
    assert metrics["rollout_corr/ratio_max"] == pytest.approx(3.0)
    assert metrics["rollout_corr/ratio_min"] == pytest.approx(0.4)
    assert metrics["rollout_corr/masked_frac"] == pytest.approx(2 / 5)  # 0.4 and 3.0 leave the band
    assert metrics["rollout_corr/weight_mean"] == pytest.approx((1.0 + 1.25 + 0.8) / 5)
    k3 = sum(r - 1 - math.log(r) for r in real) / 5
    assert metrics["rollout_corr/kl"] == pytest.approx(k3)


def test_no_mismatch_is_weight_one_and_kl_zero():
    w, metrics = rollout_correction(SAMPLER, SAMPLER, MASK, "tis")
    torch.testing.assert_close(w, MASK.double())
    assert metrics["rollout_corr/kl"] == 0 and metrics["rollout_corr/ratio_max"] == 1.0


def test_unknown_mode_and_a_correction_without_recompute_are_errors():
    with pytest.raises(ValueError, match="choose one of: none, tis, mis, seq_mis"):
        rollout_correction(TRAINER, SAMPLER, MASK, "icepop")
    with pytest.raises(ConfigError, match=r"leave algo\.recompute_old_logp at null"):
        GRPOConfig(rollout_correction="tis", recompute_old_logp=False)


@pytest.mark.parametrize("mode", ROLLOUT_CORRECTIONS)
def test_a_step_with_each_mode_logs_the_mismatch(mode, tiny_model, tokenizer, letter_e_reward):
    # fp32 on a CPU: the sampler's and the trainer's log-probs agree to ~1e-6, so every weight is ~1
    cfg = GRPOConfig(
        prompts_per_step=2, group_size=2, minibatch_size=4, micro_batch_size=4, max_new_tokens=6, beta=0.0,
        rollout_correction=mode, recompute_old_logp=True,
    )  # fmt: skip
    torch.manual_seed(0)
    built = build_grpo(stage_context(tiny_model, tokenizer, cfg, letter_e_reward, train_rows=say_rows(tokenizer)))
    metrics = built.algorithm.step(built.sampler.draw()).metrics
    assert metrics["rollout_corr/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert 0 <= metrics["rollout_corr/kl"] < 1e-6
    assert metrics["rollout_corr/masked_frac"] == 0.0
    assert math.isfinite(metrics["loss"])
