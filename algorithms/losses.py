"""Policy-gradient losses and KL estimators: pure functions of tensors.

A policy loss is two choices, kept apart as TRL keeps them (`loss_type` vs `importance_sampling_level`):
- the per-token surrogate, a function of each token's new and old log-prob and its advantage (`SURROGATES`:
  PPO's clipped ratio, CISPO, SAPO; `register_surrogate` adds one), with the importance ratio taken per token
  or per sequence (`ratio_level`);
- the aggregation of per-token losses into one number (`loss_type`: one weight per token,
  `token_loss_weights`).
`token_policy_loss` composes the per-token loss (surrogate, rollout-correction weight, beta * KL): the fused
route (models.fused_loss, inside the lm_head pass) and the two-pass route (`policy_loss`, on log-probs) both
call it, so a surrogate added here trains the same way in both. Names and definitions follow TRL's GRPO trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.advantages import masked_mean

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # how per-token losses are aggregated
RATIO_LEVELS = ("token", "sequence")

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


@dataclass(frozen=True)
class SurrogateParams:
    """The settings every surrogate receives (each reads its own)."""

    clip_low: float = 0.2  # clip: the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    cispo_cap: float = 5.0  # cispo: upper bound of the detached ratio (TRL: epsilon_high under loss_type=cispo)
    sapo_tau_pos: float = 1.0  # sapo: the gate's temperature for tokens with A > 0
    sapo_tau_neg: float = 1.05  # ... and for A <= 0 (steeper: negative updates decay faster)


@dataclass
class SurrogateOut:
    loss: Tensor  # [...] per-token loss, differentiable in logp
    clipped_low: Tensor  # [...] bool: the token's gradient was cut on the low side (for clip_frac_low)
    clipped_high: Tensor  # [...] bool: ... on the high side


# (logp, old_logp, advantages, params) -> SurrogateOut; elementwise in the tokens (broadcasting advantages)
Surrogate = Callable[[Tensor, Tensor, Tensor, SurrogateParams], SurrogateOut]
SURROGATES: dict[str, Surrogate] = {}


def register_surrogate(name: str) -> Callable[[Surrogate], Surrogate]:
    """Decorator: `algo.surrogate=<name>` picks the function. It must be elementwise in the tokens (each token's
    loss a function of its own log-prob), which is what lets the fused route form its gradient in the forward."""

    def decorator(fn: Surrogate) -> Surrogate:
        SURROGATES[name] = fn
        return fn

    return decorator


@register_surrogate("clip")
def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, params: SurrogateParams) -> SurrogateOut:
    """PPO's clipped surrogate (Schulman et al. 2017): -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A),
    r = pi / pi_old. clip_high > clip_low is DAPO's clip-higher."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - params.clip_low, 1.0 + params.clip_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    low = (ratio < 1.0 - params.clip_low) & (advantages < 0)
    high = (ratio > 1.0 + params.clip_high) & (advantages > 0)
    return SurrogateOut(loss, low, high)


@register_surrogate("cispo")
def cispo_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, params: SurrogateParams) -> SurrogateOut:
    """CISPO (MiniMax-M1, arXiv 2506.13585): -sg(min(r, cispo_cap)) A log pi. The importance weight is clipped
    and detached instead of the update, so every token keeps a gradient (TRL's loss_type=cispo)."""
    ratio = torch.exp(logp - old_logp)
    weight = torch.clamp(ratio, max=params.cispo_cap).detach()
    high = (ratio > params.cispo_cap) & (advantages > 0)
    return SurrogateOut(-weight * advantages * logp, torch.zeros_like(high), high)


@register_surrogate("sapo")
def sapo_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, params: SurrogateParams) -> SurrogateOut:
    """SAPO (Soft Adaptive Policy Optimization, arXiv 2511.20347): -f(r) A with the soft gate
    f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = sapo_tau_pos where A > 0 else sapo_tau_neg (TRL's loss_type=sapo).
    f'(1) = 1, so at r = 1 the gradient is the plain policy gradient; it fades smoothly off-policy."""
    ratio = torch.exp(logp - old_logp)
    tau = torch.where(advantages > 0, logp.new_tensor(params.sapo_tau_pos), logp.new_tensor(params.sapo_tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    loss = -gate * advantages
    none = torch.zeros(loss.shape, dtype=torch.bool, device=loss.device)
    return SurrogateOut(loss, none, none)


def token_policy_loss(
    logp: Tensor,  # [...] log-probs of the sampled tokens under the policy being optimised
    old_logp: Tensor,  # [...] under the policy that the ratio is taken against (see sequence_ratio_old_logp)
    advantages: Tensor,  # broadcastable to logp
    surrogate: str = "clip",
    params: SurrogateParams = SurrogateParams(),
    is_weight: Tensor | None = None,  # [...] rollout-correction weight of each token (detached), or None
    kl: Tensor | None = None,  # [...] per-token KL to the reference, added as beta * kl (not re-weighted)
    beta: float = 0.0,
) -> SurrogateOut:
    """The per-token policy loss both routes use: surrogate (x the rollout-correction weight) + beta * kl."""
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate={surrogate!r}; choose one of: {', '.join(SURROGATES)}")
    out = SURROGATES[surrogate](logp, old_logp, advantages, params)
    loss = out.loss if is_weight is None else out.loss * is_weight
    if kl is not None and beta != 0.0:
        loss = loss + beta * kl
    return SurrogateOut(loss, out.clipped_low, out.clipped_high)


def sequence_ratio_old_logp(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """[B, T] "old" log-probs that turn the token-level surrogates into sequence-level ones (GSPO, Zheng et al.
    2025, arXiv 2507.18071, in its GSPO-token form): logp - result = sg(s_i) + logp - sg(logp), whose value is
    each sequence's mean log-ratio s_i and whose gradient w.r.t. each token's logp is 1. With one weight per
    token within a sequence (every loss_type) the gradient is GSPO's. logp: [B, T] (only its value is used)."""
    logp = logp.detach()
    seq_log_ratio = masked_mean(logp - old_logp, mask, dim=1)[:, None]  # [B, 1]
    return (logp - seq_log_ratio) * mask.to(logp.dtype) + old_logp * (1 - mask.to(logp.dtype))


def token_loss_weights(
    mask: Tensor, loss_type: str = "grpo", max_len: int | None = None, num_tokens: float | None = None
) -> Tensor:
    """w [B, T] such that the loss_type's aggregate of per-token losses x [B, T] is (w * x).sum().

    grpo: 1 / (B * real tokens of the row); bnpo: 1 / real tokens of the batch;
    dr_grpo: 1 / (B * max_len); dapo: 1 / num_tokens (the whole minibatch's). 0 on padding.
    """
    check_loss_type(loss_type)
    mask = mask.float()
    B, T = mask.shape
    if loss_type == "grpo":
        return mask / (mask.sum(1, keepdim=True).clamp(min=1.0) * B)
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return mask / (B * (max_len or T))
    return mask / max(float(num_tokens if num_tokens is not None else mask.sum()), 1.0)  # dapo


def check_loss_type(loss_type: str) -> None:
    if loss_type == "gspo":
        raise ValueError(
            "loss_type=gspo is a ratio level, not an aggregation: write loss_type=grpo ratio_level=sequence "
            "(algo.loss_type=grpo algo.ratio_level=sequence)"
        )
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; choose one of: {', '.join(LOSS_TYPES)}")


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
    surrogate: str = "clip",
    ratio_level: str = "token",
    is_weight: Tensor | None = None,  # [B, T] rollout-correction weights (algorithms.rollout_correction)
    params: SurrogateParams | None = None,  # the other surrogates' settings (its clip is clip_low / clip_high)
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss on log-probs (the two-pass route): `token_policy_loss` aggregated by loss_type.

    grpo: mean over each sequence's tokens, then over sequences; bnpo: mean over all real tokens;
    dr_grpo: token sum / (B * max_len); dapo: token sum / num_tokens. ratio_level=sequence takes one importance
    ratio per sequence (the exp of its mean token log-ratio; GSPO). Returns (scalar loss, detached stats).
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level={ratio_level!r}; choose one of: {', '.join(RATIO_LEVELS)}")
    params = dataclasses.replace(params or SurrogateParams(), clip_low=clip_low, clip_high=clip_high)
    weights = token_loss_weights(mask, loss_type, max_len, num_tokens).to(logp.dtype)  # validates loss_type
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # [B, 1] broadcasts over tokens
    ratio_old = sequence_ratio_old_logp(logp, old_logp, mask) if ratio_level == "sequence" else old_logp
    out = token_policy_loss(logp, ratio_old, advantages, surrogate, params, is_weight, kl, beta)
    loss = (out.loss * weights).sum()
    with torch.no_grad():
        stats = policy_loss_stats(logp, old_logp, ratio_old, advantages, mask, out)
        if kl is not None:
            stats["kl/loss_term"] = masked_mean(kl.detach(), mask)  # the estimator in the loss, current policy
    return loss, stats


def policy_loss_stats(
    logp: Tensor, old_logp: Tensor, ratio_old: Tensor, advantages: Tensor, mask: Tensor, out: SurrogateOut
) -> dict[str, Tensor]:
    """The update's diagnostics over real tokens: clip fractions, the ratio the surrogate saw, approx_kl."""
    mask = mask.to(logp.dtype)
    low, high = out.clipped_low.expand_as(mask), out.clipped_high.expand_as(mask)
    token_log_ratio = (logp - old_logp).detach()
    return {
        "clip_frac_low": masked_mean(low.float(), mask),
        "clip_frac_high": masked_mean(high.float(), mask),
        "clip_frac": masked_mean((low | high).float(), mask),
        "ratio_mean": masked_mean(torch.exp(logp.detach() - ratio_old), mask),
        # Schulman's k3 between the sampling and current policy: how far the update has moved
        "approx_kl": masked_mean(torch.expm1(token_log_ratio) - token_log_ratio, mask),
    }


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


def accumulation_weight(loss_type: str, share: float, token_share: float | None = None) -> float:
    """Weight of one micro-batch's loss when several are accumulated into one optimiser step.

    Per-sequence and per-token means are means over the micro-batch, so they are weighted by its share
    of the minibatch; dapo's loss is already divided by the minibatch's token count.
    share: the micro-batch's fraction of the minibatch's sequences; token_share: the weight of a token mean
    over the micro-batch (bnpo's), `share` when None (training.update.MicroShare.token_mean).
    """
    if loss_type == "dapo":
        return 1.0
    return token_share if loss_type == "bnpo" and token_share is not None else share


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
