"""Policy-gradient losses and KL estimators: pure functions of tensors.

The loss variants sit side by side in one function so that their one-line differences show; each
uses the definition of the same name in TRL's GRPO trainer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.advantages import masked_mean

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "gspo")
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (http://joschu.net/blog/kl-approx.html).

    k1 = log pi/ref (unbiased, can be negative); k2 = (log pi/ref)^2 / 2 (biased, low variance);
    k3 = ref/pi - 1 - log ref/pi (unbiased, always >= 0; GRPO's choice).
    """
    log_ratio = logp - ref_logp  # log pi/ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kind={kind!r}; choose one of: {', '.join(KL_ESTIMATORS)}")


TOKEN_SEPARABLE = ("grpo", "bnpo", "dr_grpo", "dapo")  # a fixed weight per token: see token_loss_weights


def clipped_surrogate(
    log_ratio: Tensor,  # [...] log pi/pi_old of the sampled tokens (or gspo's per-sequence mean)
    advantages: Tensor,  # broadcastable to log_ratio
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> Tensor:
    """Per-token -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), r = exp(log_ratio)."""
    ratio = torch.exp(log_ratio)
    return -torch.min(ratio * advantages, torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages)


def token_loss_weights(
    mask: Tensor, loss_type: str = "grpo", max_len: int | None = None, num_tokens: float | None = None
) -> Tensor:
    """w [B, T] such that the loss_type's aggregate of per-token losses x [B, T] is (w * x).sum().

    grpo (and gspo): 1 / (B * real tokens of the row); bnpo: 1 / real tokens of the batch;
    dr_grpo: 1 / (B * max_len); dapo: 1 / num_tokens (the whole minibatch's). 0 on padding.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; choose one of: {', '.join(LOSS_TYPES)}")
    mask = mask.float()
    B, T = mask.shape
    if loss_type in ("grpo", "gspo"):
        return mask / (mask.sum(1, keepdim=True).clamp(min=1.0) * B)
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return mask / (B * (max_len or T))
    return mask / max(float(num_tokens if num_tokens is not None else mask.sum()), 1.0)  # dapo


def policy_loss(
    logp: Tensor,  # [B, T] under the policy being optimised
    old_logp: Tensor,  # [B, T] under the policy that sampled the tokens
    advantages: Tensor,  # [B] per sequence, or [B, T] per token
    mask: Tensor,  # [B, T] 1 on real completion tokens
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_type: str = "grpo",
    kl: Tensor | None = None,  # [B, T] per-token KL to the reference, added as beta * kl
    beta: float = 0.0,
    max_len: int | None = None,  # dr_grpo's constant denominator; defaults to T
    num_tokens: float | None = None,  # dapo's denominator: real tokens in the whole batch; defaults to mask.sum()
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) (+ beta KL), aggregated by loss_type.

    grpo: mean over each sequence's tokens, then over sequences; bnpo: mean over all real tokens;
    dr_grpo: token sum / (B * max_len); dapo: token sum / num_tokens; gspo: one importance ratio per
    sequence (the exp of the mean token log-ratio), aggregated like grpo.
    Every variant is a weighted sum of per-token losses (`token_loss_weights`); all but gspo are also
    elementwise in the tokens' log-probs, which lets `models.fused_loss` form the gradient in its forward.
    Returns (scalar loss, detached stats).
    """
    weights = token_loss_weights(mask, loss_type, max_len, num_tokens).to(logp.dtype)  # validates loss_type
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # [B, 1] broadcasts over tokens
    log_ratio = logp - old_logp  # [B, T]
    if loss_type == "gspo":
        log_ratio = masked_mean(log_ratio, mask, dim=1)[:, None]  # [B, 1]
    ratio = torch.exp(log_ratio)
    per_token = clipped_surrogate(log_ratio, advantages, clip_low, clip_high)
    per_token = per_token.expand_as(mask)  # [B, T] (gspo's [B, 1] too)
    if kl is not None and beta != 0.0:
        per_token = per_token + beta * kl
    loss = (per_token * weights).sum()

    with torch.no_grad():
        ratio_t = ratio.expand_as(mask)
        adv_t = advantages.expand_as(mask)
        low = (ratio_t < 1.0 - clip_low) & (adv_t < 0)
        high = (ratio_t > 1.0 + clip_high) & (adv_t > 0)
        token_log_ratio = (logp - old_logp).detach()
        stats = {
            "clip_frac_low": masked_mean(low.float(), mask),
            "clip_frac_high": masked_mean(high.float(), mask),
            "clip_frac": masked_mean((low | high).float(), mask),
            "ratio_mean": masked_mean(ratio_t.detach(), mask),
            # Schulman's k3 between the sampling and current policy: how far the update has moved
            "approx_kl": masked_mean(torch.expm1(token_log_ratio) - token_log_ratio, mask),
        }
        if kl is not None:
            stats["kl"] = masked_mean(kl.detach(), mask)
    return loss, stats


def value_loss(
    values: Tensor,  # [B, T] current critic
    old_values: Tensor,  # [B, T] critic at rollout time
    returns: Tensor,  # [B, T]
    mask: Tensor,  # [B, T]
    clip: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss: 0.5 * mean max((V - R)^2, (clip(V, V_old +- clip) - R)^2) over real tokens."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((clipped_err > unclipped_err).float(), mask)}
    return loss, stats


def accumulation_weight(loss_type: str, share: float) -> float:
    """Weight of one micro-batch's loss when several are accumulated into one optimiser step.

    Per-sequence and per-token means are means over the micro-batch, so they are weighted by its share
    of the minibatch; dapo's loss is already divided by the minibatch's token count.
    share: the micro-batch's fraction of the minibatch's sequences.
    """
    return 1.0 if loss_type == "dapo" else share


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-model loss -log sigmoid(r_chosen - r_rejected), mean over pairs (Ouyang et al. 2022, eq. 1).

    chosen, rejected: [B] scores of the preferred and the other response to the same prompt.
    Stats: accuracy (share of pairs ranked right; a tie counts as wrong) and the mean margin.
    """
    margin = chosen - rejected  # [B]
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {"accuracy": (margin > 0).float().mean(), "margin": margin.mean()}
    return loss, stats
