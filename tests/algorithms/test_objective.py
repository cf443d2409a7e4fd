"""policy_objective: the fused route (loss inside the lm_head pass) gives the two-pass route's loss,
statistics and gradients for every aggregation, surrogate and ratio level, with and without the KL term, the
entropy bonus and rollout-correction weights; and a surrogate registered in one place trains both routes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from algorithms.common import micro_logprobs
from algorithms.grpo import GRPOConfig
from algorithms.losses import LOSS_TYPES, RATIO_LEVELS, SURROGATES, SurrogateOut, token_loss_weights
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


@pytest.mark.parametrize("ratio_level", RATIO_LEVELS)
@pytest.mark.parametrize("surrogate", ["clip", "cispo", "sapo"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_fused_and_two_pass_routes_agree(tiny_model, loss_type, surrogate, ratio_level, algo):
    tiny_model.train()
    options = dict(loss_type=loss_type, surrogate=surrogate, ratio_level=ratio_level, temperature=0.8, cispo_cap=2.0)
    if algo == "grpo":  # KL in the loss, one advantage per sequence
        cfg, kwargs = GRPOConfig(**options), {"weight": 0.5, "beta": 0.04}
    else:  # per-token advantages, an entropy bonus, rollout-correction weights
        cfg, kwargs = PPOConfig(**options), {"weight": 0.5, "entropy_weight": 0.01}
    micro = micro_batch(tiny_model.config.vocab_size, per_token_advantages=algo == "ppo")
    if algo == "ppo":
        gen = torch.Generator().manual_seed(1)
        micro["is_weight"] = torch.rand(micro["completion_mask"].shape, generator=gen) * 2 * micro["completion_mask"]
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
        assert float(fused.stats["kl/loss_term"]) > 0
    if surrogate == "clip" and ratio_level == "token":
        assert 0 < float(fused.stats["clip_frac"]) < 1  # both sides of the clip are exercised


def test_a_registered_surrogate_is_the_gradient_of_both_routes(tiny_model, monkeypatch):
    """Adding a loss is one function: plain REINFORCE, -A log pi, registered and selected by name, gives exactly
    its own gradient through the fused route and through the two-pass route."""

    def reinforce(logp, old_logp, advantages, params):
        loss = -advantages * logp
        none = torch.zeros(loss.shape, dtype=torch.bool)
        return SurrogateOut(loss, none, none)

    monkeypatch.setitem(SURROGATES, "reinforce", reinforce)
    tiny_model.train()
    micro = micro_batch(tiny_model.config.vocab_size, per_token_advantages=False)
    cfg = GRPOConfig(surrogate="reinforce", loss_type="bnpo", temperature=0.8)
    # the reference: log-probs by the plain forward, the definition written out, autograd
    tiny_model.zero_grad(set_to_none=True)
    logp, _ = micro_logprobs(tiny_model, micro, cfg.temperature)
    mask = micro["completion_mask"]
    weights = token_loss_weights(mask, "bnpo")
    reference = (weights * -micro["advantages"][:, None] * logp).sum()
    reference.backward()
    expected = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
    for fused in (True, False):
        objective, grads = run(tiny_model, micro, replace(cfg, fused_loss=fused))
        torch.testing.assert_close(objective.loss.detach(), reference.detach(), atol=1e-6, rtol=1e-5)
        assert grads.keys() == expected.keys()
        for name in grads:
            scale = float(expected[name].abs().max())
            assert float((grads[name] - expected[name]).abs().max()) <= 1e-5 * scale + 1e-8, (fused, name)
