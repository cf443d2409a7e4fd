"""The policy half of PPO's and GRPO's loss on one micro-batch: the policy loss (+ beta KL) - entropy bonus.

Two routes to the same loss and gradient, both built on `losses.token_policy_loss` (the surrogate, the
rollout-correction weight and the KL term of each token), so a surrogate registered in algorithms/losses.py
trains the same way in either:
- fused (`algo.fused_loss`, the default): the loss is a weighted sum over tokens of a function of each token's
  own log-prob and entropy, so `models.fused_loss` forms its gradient inside the lm_head pass (three lm_head
  matmuls, no [tokens, V] tensor). A sequence-level ratio needs each sequence's mean log-ratio first: one more
  no-grad lm_head pass gives it;
- two-pass: log-probs first, then `losses.policy_loss` on them.
The logged statistics come from `policy_loss` on the log-probs in both routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.advantages import masked_mean
from algorithms.common import micro_inputs, micro_logprobs, sequence_mean
from algorithms.losses import (
    SurrogateParams,
    accumulation_weight,
    kl_estimate,
    policy_loss,
    sequence_ratio_old_logp,
    token_loss_weights,
    token_policy_loss,
)
from models.fused_loss import TokenLoss, completion_token_loss
from training.update import MicroShare


@dataclass
class PolicyObjective:
    loss: Tensor  # [] the weighted loss to backpropagate
    policy_loss: Tensor  # [] the unweighted policy loss (surrogate + beta KL), detached
    entropy: Tensor  # [n, Tc] detached, 0 on padding
    stats: dict[str, Tensor]  # policy_loss's statistics (clip fractions, ratio, approx_kl, kl/loss_term)


def surrogate_params(cfg) -> SurrogateParams:
    """The surrogate settings of an algorithm's config (clip_low/high, cispo_cap, sapo_tau_pos/neg)."""
    return SurrogateParams(cfg.clip_low, cfg.clip_high, cfg.cispo_cap, cfg.sapo_tau_pos, cfg.sapo_tau_neg)


def policy_objective(
    model: torch.nn.Module,
    micro: dict[str, Tensor],  # old_logp, advantages ([n] or [n, Tc]), completion_mask; ref_logp, is_weight if any
    cfg,  # the algorithm's config: temperature, loss_type, surrogate and its settings, ratio_level, fused_loss, ...
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
        "surrogate": cfg.surrogate,
        "ratio_level": cfg.ratio_level,
        "is_weight": micro.get("is_weight"),
        "params": surrogate_params(cfg),
    }
    if cfg.fused_loss:

        def token_loss_for(logp_now: Tensor | None) -> TokenLoss:  # logp_now [n, Tc]: only for the sequence ratio
            old = micro["old_logp"] if logp_now is None else sequence_ratio_old_logp(logp_now, micro["old_logp"], mask)
            return _token_loss(micro, old, cfg, num_tokens, weight, ref_logp, beta, entropy_weight)

        sequence = cfg.ratio_level == "sequence"
        loss, logp, entropy = completion_token_loss(
            model,
            *micro_inputs(micro),
            None if sequence else token_loss_for(None),
            cfg.temperature,
            with_entropy=True,
            token_loss_for=token_loss_for if sequence else None,
        )
        assert entropy is not None  # with_entropy=True
        with torch.no_grad():
            kl = kl_estimate(logp, ref_logp, cfg.kl_estimator) if ref_logp is not None else None
            pg_loss, stats = policy_loss(logp, micro["old_logp"], micro["advantages"], mask, kl=kl, **loss_kwargs)
        return PolicyObjective(loss, pg_loss, entropy, stats)
    logp, entropy = micro_logprobs(model, micro, cfg.temperature, with_entropy=True, entropy_grad=entropy_weight > 0)
    assert entropy is not None  # with_entropy=True
    kl = kl_estimate(logp, ref_logp, cfg.kl_estimator) if ref_logp is not None else None
    pg_loss, stats = policy_loss(logp, micro["old_logp"], micro["advantages"], mask, kl=kl, **loss_kwargs)
    loss = weight * pg_loss
    if entropy_weight:
        loss = loss - entropy_weight * masked_mean(entropy, mask)
    return PolicyObjective(loss, pg_loss.detach(), entropy.detach(), stats)


def policy_micro_loss(
    model: torch.nn.Module, micro: dict[str, Tensor], cfg, share: MicroShare, beta: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Every algorithm's policy loss on one micro-batch, weighted for its share of the minibatch
    (training.update.MicroShare), and the statistics it logs: policy_loss's, `entropy` and `loss` (the unweighted
    policy loss). `beta`: the KL coefficient in the loss (0 when the KL is in the rewards)."""
    objective = policy_objective(
        model,
        micro,
        cfg,
        share.minibatch_tokens,
        weight=accumulation_weight(cfg.loss_type, share.sequences, share.token_mean),
        beta=beta,
        entropy_weight=cfg.ent_coef * share.token_mean,
    )
    stats = objective.stats
    stats["entropy"] = torch.tensor(sequence_mean(objective.entropy, micro["completion_mask"]))
    stats["loss"] = objective.policy_loss
    return objective.loss, stats


def _token_loss(
    micro: dict[str, Tensor],
    ratio_old: Tensor,  # [n, Tc] the log-probs the ratio is taken against (old_logp, or the sequence-level form)
    cfg,
    num_tokens: float,
    weight: float,
    ref_logp: Tensor | None,
    beta: float,
    entropy_weight: float,
) -> TokenLoss:
    """The objective as models.fused_loss's per-token function of (logp, entropy, flat positions)."""
    mask = micro["completion_mask"]
    advantages = micro["advantages"]
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(mask)
    # flat [n * Tc] views that the positions index
    w = (weight * token_loss_weights(mask, cfg.loss_type, cfg.max_new_tokens, num_tokens)).reshape(-1)
    entropy_w = (entropy_weight * token_loss_weights(mask, "bnpo")).reshape(-1)  # masked_mean over all real tokens
    old, adv = ratio_old.reshape(-1), advantages.reshape(-1)
    ref = ref_logp.reshape(-1) if ref_logp is not None else None
    is_weight = micro["is_weight"].reshape(-1) if "is_weight" in micro else None
    params = surrogate_params(cfg)

    def token_loss(logp: Tensor, entropy: Tensor | None, positions: Tensor) -> Tensor:  # [c] each
        kl = kl_estimate(logp, ref[positions], cfg.kl_estimator) if ref is not None else None
        correction = is_weight[positions] if is_weight is not None else None
        out = token_policy_loss(logp, old[positions], adv[positions], cfg.surrogate, params, correction, kl, beta)
        loss = w[positions] * out.loss
        if entropy_weight and entropy is not None:
            loss = loss - entropy_w[positions] * entropy
        return loss

    return token_loss
