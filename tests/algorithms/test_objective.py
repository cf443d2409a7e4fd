"""policy_objective: the fused route (loss inside the lm_head pass) gives the two-pass route's loss,
statistics and gradients for every loss type, with and without the KL term and the entropy bonus."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from algorithms.grpo import GRPOConfig
from algorithms.losses import LOSS_TYPES
from algorithms.objective import policy_objective
from algorithms.ppo import PPOConfig


def micro_batch(vocab: int, per_token_advantages: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n, tp, tc = 4, 4, 6
    prompt_mask = torch.ones(n, tp, dtype=torch.long)
    prompt_mask[1, :2] = 0
    completion_mask = torch.ones(n, tc, dtype=torch.long)
    completion_mask[0, 3:] = 0
    completion_mask[2, 1:] = 0
    advantages = torch.randn(n, tc, generator=gen) if per_token_advantages else torch.randn(n, generator=gen)
    return {
        "prompt_ids": torch.randint(0, vocab, (n, tp), generator=gen) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(0, vocab, (n, tc), generator=gen) * completion_mask,
        "completion_mask": completion_mask,
        # old and reference log-probs off the current policy's, so that ratios clip and KL is not 0
        "old_logp": (-torch.rand(n, tc, generator=gen) * 8) * completion_mask,
        "ref_logp": (-torch.rand(n, tc, generator=gen) * 8) * completion_mask,
        "advantages": advantages,
    }


def run(model, micro, cfg, **kwargs):
    model.zero_grad(set_to_none=True)
    objective = policy_objective(model, micro, cfg, num_tokens=30.0, **kwargs)
    objective.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return objective, grads


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_fused_and_two_pass_routes_agree(tiny_model, loss_type, algo):
    tiny_model.train()
    if algo == "grpo":  # KL in the loss, one advantage per sequence
        cfg, kwargs = GRPOConfig(loss_type=loss_type, temperature=0.8), {"weight": 0.5, "beta": 0.04}
    else:  # per-token advantages, an entropy bonus
        cfg, kwargs = PPOConfig(loss_type=loss_type, temperature=0.8), {"weight": 0.5, "entropy_weight": 0.01}
    micro = micro_batch(tiny_model.config.vocab_size, per_token_advantages=algo == "ppo")
    fused, fused_grads = run(tiny_model, micro, replace(cfg, fused_loss=True), **kwargs)
    plain, plain_grads = run(tiny_model, micro, replace(cfg, fused_loss=False), **kwargs)
    torch.testing.assert_close(fused.loss.detach(), plain.loss.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused.policy_loss, plain.policy_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused.entropy, plain.entropy, atol=1e-5, rtol=1e-5)
    assert fused.stats.keys() == plain.stats.keys()
    for key in fused.stats:
        torch.testing.assert_close(fused.stats[key], plain.stats[key], atol=1e-6, rtol=1e-5, msg=key)
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    for name in fused_grads:  # fp32 sums in another order: equal to 1e-5 of each tensor's scale
        scale = float(plain_grads[name].abs().max())
        assert float((fused_grads[name] - plain_grads[name]).abs().max()) <= 1e-5 * scale + 1e-8, name
    if algo == "grpo":
        assert float(fused.stats["kl"]) > 0
    assert 0 < float(fused.stats["clip_frac"]) < 1  # both sides of the clip are exercised
