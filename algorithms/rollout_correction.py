"""The sampler-vs-trainer mismatch: measured every step the old log-probs are recomputed, corrected when asked.

The sampler (KV-cached decode, CUDA graphs, bf16) and the training forward round differently, so the tokens come
from a policy pi_sampler slightly different from the pi_trainer the loss's ratio is taken against. With
rho_t = pi_trainer(y_t) / pi_sampler(y_t) for each sampled token (the recomputed old log-probs against the
sampling-time ones), the policy loss of token t is multiplied by a detached weight w_t:

    none     w_t = 1                                   (measured, not corrected)
    tis      w_t = min(rho_t, cap)                     truncated importance sampling (Yao et al. 2025; verl's TIS)
    mis      w_t = rho_t if low <= rho_t <= high else 0     masked IS, token level (IcePop; OpenRLHF's icepop)
    seq_mis  w_t = min(rho_t, cap) if low <= exp(mean_t log rho_t) <= high else 0   (OpenRLHF's seq-mask-tis)

A pure function of tensors; the policy-gradient algorithms call it in `PolicyGradient.sample`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.advantages import masked_mean

ROLLOUT_CORRECTIONS = ("none", "tis", "mis", "seq_mis")


def rollout_correction(
    trainer_logp: Tensor,  # [N, Tc] the recomputed old log-probs (the training forward's)
    sampler_logp: Tensor,  # [N, Tc] the log-probs recorded while sampling
    mask: Tensor,  # [N, Tc] 1 on real completion tokens
    mode: str = "none",
    cap: float = 2.0,
    low: float = 0.5,
    high: float = 2.0,
) -> tuple[Tensor, dict[str, float]]:
    """(w [N, Tc] detached, 0 on padding; the mismatch metrics): rollout_corr/ratio_mean, ratio_max, ratio_min,
    masked_frac (the share of real tokens the mode zeroed), weight_mean and kl: KL(pi_sampler || pi_trainer) per
    token by Schulman's k3, rho - 1 - log rho, which is >= 0 and 0 only where the two agree."""
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout correction {mode!r}; choose one of: {', '.join(ROLLOUT_CORRECTIONS)}")
    mask = mask.to(trainer_logp.dtype)
    log_rho = ((trainer_logp - sampler_logp) * mask).detach()  # [N, Tc]
    rho = torch.exp(log_rho)
    if mode == "none":
        weights = torch.ones_like(rho)
    elif mode == "tis":
        weights = torch.clamp(rho, max=cap)
    elif mode == "mis":
        weights = rho * ((rho >= low) & (rho <= high)).to(rho.dtype)
    else:  # seq_mis
        seq_rho = torch.exp(masked_mean(log_rho, mask, dim=1))[:, None]  # [N, 1] geometric mean per sequence
        weights = torch.clamp(rho, max=cap) * ((seq_rho >= low) & (seq_rho <= high)).to(rho.dtype)
    weights = weights * mask
    real = mask.bool()
    metrics = {
        "rollout_corr/ratio_mean": float(masked_mean(rho, mask)),
        "rollout_corr/ratio_max": float(rho[real].max()) if real.any() else 1.0,
        "rollout_corr/ratio_min": float(rho[real].min()) if real.any() else 1.0,
        "rollout_corr/masked_frac": float(masked_mean(((weights == 0) & real).to(rho.dtype), mask)),
        "rollout_corr/weight_mean": float(masked_mean(weights, mask)),
        "rollout_corr/kl": float(masked_mean(torch.expm1(log_rho) - log_rho, mask)),
    }
    return weights, metrics
