"""Advantage estimators: pure functions of tensors (no model, no config)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantages.

    rewards: [N] with N = P * G, group-contiguous (the G samples of one prompt adjacent).
    Returns [N]: r - mean(group), divided by (std + eps) where std is the unbiased standard deviation
    of the group (scale="group", the GRPO paper and TRL), of the whole batch (scale="batch"), or not
    divided at all (scale="none", Dr. GRPO). A group whose rewards are all equal gets 0, not NaN.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rearrange(rewards.float(), "(p g) -> p g", g=group_size)  # [P, G]
    centred = rearrange(grouped - grouped.mean(dim=1, keepdim=True), "p g -> (p g)")
    return centred / group_scale(rewards, group_size, scale, eps)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is 1 (all of them, or along `dim`); 0 where nothing is real."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the real entries of x (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the real entries; keeps the mean when shift_mean is False. Padding -> 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(out.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over per-token rewards.

    rewards, values, mask: [B, T]; values[:, t] is V of the state in which token t is chosen.
    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    Masked positions are skipped as if absent (the recursion carries over them) and get 0 in both
    outputs; the value after the last real token is 0 (the episode ends there).
    Returns (advantages [B, T], returns [B, T]) in the dtype of `values`.
    """
    real = mask.bool()
    rewards = rewards.to(values.dtype)
    B, T = values.shape
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(B)  # V_{t+1}: 0 past the end
    last_gae = values.new_zeros(B)  # A_{t+1}
    for t in reversed(range(T)):  # cleanrl's backward loop, vectorised over the batch
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae_t = delta + gamma * lam * last_gae
        advantages[:, t] = torch.where(real[:, t], gae_t, 0.0)
        last_gae = torch.where(real[:, t], gae_t, last_gae)
        next_value = torch.where(real[:, t], values[:, t], next_value)
    returns = torch.where(real, advantages + values, 0.0)
    return advantages, returns


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 is a perfect critic, 0 no better
    than a constant, < 0 worse; NaN when the returns do not vary (cleanrl's `explained_var`)."""
    var_returns = masked_var(returns, mask)
    if var_returns == 0:
        return torch.tensor(float("nan"))
    return 1.0 - masked_var(returns - values, mask) / var_returns


def kl_penalised_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """PPO's per-token rewards: r_t = -beta * KL_t on every real token, + the sequence's score on its last one.

    scores: [N]; kl: [N, T] per-token KL estimate; mask: [N, T] 1 on real completion tokens.
    Returns [N, T] fp32, 0 on padding; a row without a real token gets nothing (no token to reward).
    """
    real = mask.bool()
    rewards = torch.where(real, -beta * kl.float(), 0.0)  # [N, T]
    positions = torch.arange(mask.shape[1], device=mask.device)  # [T]
    last = torch.where(real, positions, -1).max(dim=1).values  # [N] index of the last real token, -1 if none
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards[rows, last[rows]] += scores[rows].float()
    return rewards


GROUP_BASELINES = ("group_mean", "leave_one_out")


def group_baseline(rewards: Tensor, group_size: int, kind: str = "group_mean") -> Tensor:
    """Each sample's baseline from its prompt's group: the mean of the G rewards (group_mean, GRPO's) or of
    the other G - 1 (leave_one_out, RLOO's).

    rewards: [N] with N = P * G, group-contiguous. Returns [N] fp32.
    """
    if kind not in GROUP_BASELINES:
        raise ValueError(f"kind={kind!r}; choose one of: {', '.join(GROUP_BASELINES)}")
    if kind == "leave_one_out" and group_size < 2:
        raise ValueError(f"group_size={group_size}: a leave-one-out baseline needs at least 2 samples per prompt")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rearrange(rewards.float(), "(p g) -> p g", g=group_size)  # [P, G]
    total = grouped.sum(dim=1, keepdim=True)  # [P, 1]
    if kind == "group_mean":
        baseline = (total / group_size).expand_as(grouped)
    else:
        baseline = (total - grouped) / (group_size - 1)  # [P, G] mean of the others
    return rearrange(baseline, "p g -> (p g)")


def group_scale(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """The divisor of `group_advantages`: std + eps of each sample's group (group), of the whole batch
    (batch), or 1 (none). rewards: [N] group-contiguous. Returns [N] fp32."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale={scale!r}; choose one of: group, batch, none")
    grouped = rearrange(rewards.float(), "(p g) -> p g", g=group_size)  # [P, G]
    if scale == "none":
        return torch.ones_like(rewards, dtype=torch.float32)
    if scale == "group":
        # a group of one has no spread: its std is taken as 0 instead of torch's NaN
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    else:
        std = grouped.std().reshape(1, 1) if grouped.numel() > 1 else torch.zeros(1, 1)
    return rearrange((std + eps).expand_as(grouped), "p g -> (p g)")


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Returns-to-go G_t = sum_{s >= t} gamma^(s - t) r_s over the real tokens of each row.

    token_rewards, mask: [N, T]. Masked positions are skipped as if absent (the sum carries over them)
    and get 0; gamma = 1 is a reverse cumulative sum.
    Returns [N, T] fp32.
    """
    rewards = token_rewards.float()
    # GAE's backward recursion with a zero critic and lam = 1: its returns are exactly these
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[1]


def sequence_returns(returns: Tensor, mask: Tensor) -> Tensor:
    """The return of each whole sequence: returns [N, T] at the row's first real token; 0 for a row without
    one. Returns [N]."""
    first = mask.long().argmax(dim=1, keepdim=True)  # [N, 1] (0 for a row of padding, whose returns are 0)
    return returns.gather(1, first).squeeze(1)


def group_baselined_returns(
    token_rewards: Tensor, mask: Tensor, group_size: int, baseline: str = "group_mean", gamma: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Returns-to-go with a group baseline in place of a critic: A_t = G_t - b, where b is the group mean
    (or leave-one-out mean) of the prompt's whole-sequence returns G_0. PPO's GAE with lam = 1 and V(s_t)
    replaced by one number per prompt; with the KL only in the loss (token_rewards = the score on the last
    token) every token of sequence i gets score_i - b_i, Dr. GRPO's (or G / (G - 1) times RLOO's) advantage.

    token_rewards, mask: [N, T], rows group-contiguous. Returns (advantages [N, T] 0 on padding, the
    returns-to-go G_t [N, T]).
    """
    returns = discounted_returns(token_rewards, mask, gamma)  # [N, T]
    base = group_baseline(sequence_returns(returns, mask), group_size, baseline)  # [N]
    return (returns - base[:, None]) * mask.to(returns.dtype), returns


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), times `factor`, for completion lengths [N].

    0 up to max_len - buffer tokens, then linear, (max_len - buffer - |y|) / buffer, down to -1 at max_len
    (and -1 beyond it); buffer = 0 is off. Added to the sequence reward, it tells a truncated answer from a
    long one that ends in time, which the hard cut alone does not. Returns [N] fp32.
    """
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0.0)  # tokens into the buffer
    return -factor * (over / buffer).clamp(max=1.0)
