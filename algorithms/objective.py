"""The policy half of PPO's and GRPO's loss on one micro-batch: clipped surrogate (+ beta KL) - entropy bonus.

Two routes to the same loss and gradient:
- fused (the default for every token-level loss type): the loss is a weighted sum over tokens of a
  function of each token's own log-prob and entropy, so `models.fused_loss` forms its gradient inside
  the lm_head pass (three lm_head matmuls, no [tokens, V] tensor);
- two-pass (gspo, whose ratio is per sequence, or `fused_loss: false`): log-probs first, then the loss.
The logged statistics come from `policy_loss` on the log-probs in both routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.advantages import masked_mean
from algorithms.common import micro_inputs, micro_logprobs
from algorithms.losses import TOKEN_SEPARABLE, clipped_surrogate, kl_estimate, policy_loss, token_loss_weights
from models.fused_loss import completion_token_loss


@dataclass
class PolicyObjective:
    loss: Tensor  # [] the weighted loss to backpropagate
    policy_loss: Tensor  # [] the unweighted policy loss (surrogate + beta KL), detached
    entropy: Tensor  # [n, Tc] detached, 0 on padding
    stats: dict[str, Tensor]  # policy_loss's statistics (clip fractions, ratio, approx_kl, kl)


def policy_objective(
    model: torch.nn.Module,
    micro: dict[str, Tensor],  # old_logp, advantages ([n] or [n, Tc]), completion_mask, ref_logp when beta > 0
    cfg,  # GRPOConfig | PPOConfig: temperature, clip_low/high, loss_type, max_new_tokens, kl_estimator, fused_loss
    num_tokens: float,  # real completion tokens of the minibatch (dapo's denominator)
    weight: float = 1.0,  # the policy loss's share in the accumulated step (losses.accumulation_weight)
    beta: float = 0.0,  # KL coefficient in the loss (GRPO); PPO's KL is in its rewards
    entropy_weight: float = 0.0,  # subtracted as entropy_weight * masked_mean(entropy)
) -> PolicyObjective:
    """weight * policy_loss(...) - entropy_weight * masked_mean(entropy) of the current policy on `micro`."""
    mask = micro["completion_mask"]  # [n, Tc]
    ref_logp = micro["ref_logp"] if beta > 0 and "ref_logp" in micro else None
    loss_kwargs = {
        "clip_low": cfg.clip_low,
        "clip_high": cfg.clip_high,
        "loss_type": cfg.loss_type,
        "max_len": cfg.max_new_tokens,
        "num_tokens": num_tokens,
        "beta": beta,
    }
    if cfg.fused_loss and cfg.loss_type in TOKEN_SEPARABLE:
        token_loss = _token_loss(micro, cfg, num_tokens, weight, ref_logp, beta, entropy_weight)
        loss, logp, entropy = completion_token_loss(
            model, *micro_inputs(micro), token_loss, cfg.temperature, with_entropy=True
        )
        with torch.no_grad():
            kl = kl_estimate(logp, ref_logp, cfg.kl_estimator) if ref_logp is not None else None
            pg_loss, stats = policy_loss(logp, micro["old_logp"], micro["advantages"], mask, kl=kl, **loss_kwargs)
        return PolicyObjective(loss, pg_loss, entropy, stats)
    logp, entropy = micro_logprobs(model, micro, cfg.temperature, with_entropy=True, entropy_grad=entropy_weight > 0)
    kl = kl_estimate(logp, ref_logp, cfg.kl_estimator) if ref_logp is not None else None
    pg_loss, stats = policy_loss(logp, micro["old_logp"], micro["advantages"], mask, kl=kl, **loss_kwargs)
    loss = weight * pg_loss
    if entropy_weight:
        loss = loss - entropy_weight * masked_mean(entropy, mask)
    return PolicyObjective(loss, pg_loss.detach(), entropy.detach(), stats)


def _token_loss(
    micro: dict[str, Tensor],
    cfg,
    num_tokens: float,
    weight: float,
    ref_logp: Tensor | None,
    beta: float,
    entropy_weight: float,
):
    """The objective as models.fused_loss's per-token function of (logp, entropy, flat positions)."""
    mask = micro["completion_mask"]
    advantages = micro["advantages"]
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(mask)
    # flat [n * Tc] views that the positions index
    w = (weight * token_loss_weights(mask, cfg.loss_type, cfg.max_new_tokens, num_tokens)).reshape(-1)
    entropy_w = (entropy_weight * token_loss_weights(mask, "bnpo")).reshape(-1)  # masked_mean over all real tokens
    old, adv = micro["old_logp"].reshape(-1), advantages.reshape(-1)
    ref = ref_logp.reshape(-1) if ref_logp is not None else None

    def token_loss(logp: Tensor, entropy: Tensor | None, positions: Tensor) -> Tensor:  # [c] each
        per_token = clipped_surrogate(logp - old[positions], adv[positions], cfg.clip_low, cfg.clip_high)
        if ref is not None:
            per_token = per_token + beta * kl_estimate(logp, ref[positions], cfg.kl_estimator)
        loss = w[positions] * per_token
        if entropy_weight and entropy is not None:
            loss = loss - entropy_w[positions] * entropy
        return loss

    return token_loss
