"""The metrics every RL step logs, each defined once: its name, its meaning, and for those computed from the
update's tensors, the one function that computes them for every algorithm.

`SHARED_METRICS` is the list docs/metrics.md shows (experiments/gen_options.py writes it), and
tests/algorithms/test_shared_metrics.py checks that GRPO, PPO, RLOO and REINFORCE++ log each of them, the
tensor-derived ones from the very tensors their update used. `<name>` stands for each reward part, model or
phase; the loop also logs `<key>_total`, a running sum of each count and time, restored on resume.
"""

from __future__ import annotations

from torch import Tensor

from algorithms.advantages import masked_mean, masked_var
from algorithms.common import zero_std_group_frac

SHARED_METRICS: dict[str, str] = {
    # rewards (rollout_metrics)
    "reward/total_mean": "mean total reward of the step's samples (the weighted sum of the reward parts)",
    "reward/total_std": "standard deviation of the total reward over the step's samples",
    "reward/<name>_mean": "mean of one reward part, unweighted (a weight of 0 logs it without training on it)",
    "reward/<name>_std": "standard deviation of one reward part",
    "reward/<name>_failures": "samples whose reward function raised or returned NaN/inf (scored 0)",
    "reward/zero_std_group_frac": "share of prompts whose G task rewards are all equal (G > 1): groups a group "
    "baseline gets no signal from",
    # samples
    "completion/length_mean": "mean completion length in tokens (also _max, _min)",
    "completion/truncated_frac": "share of completions cut at max_new_tokens (no EOS)",
    "completion/eos_frac": "share of completions that stopped by EOS",
    "completion/think_words_median": "median number of words inside the think block",
    "completion/recheck_frac": "share of completions with a re-checking phrase (wait, let me check, re-check)",
    "tokens/generated": "completion tokens sampled this step (dynamic sampling's discarded draws included)",
    "tokens/prompt": "prompt tokens of the step's sequences",
    "tokens/trained": "completion tokens in the loss times the passes over them (num_iterations)",
    # the advantages and the KL (step_tensor_metrics)
    "advantages/mean": "mean over the real completion tokens of the advantages the loss used (after any scaling "
    "or whitening; a per-sequence advantage counts once per token)",
    "advantages/std": "their standard deviation over the same tokens",
    "advantages/abs_mean": "their mean absolute value over the same tokens",
    "kl": "KL(pi_old || pi_ref) per token at sampling time: the mean of k1 = log pi_old - log pi_ref over real "
    "completion tokens (with a reference model)",
    "kl/sequence": "the same k1 summed over each completion, mean over completions",
    "ranks/load_spread": "under data parallelism, the heaviest rank's real tokens over the mean after the groups "
    "were balanced over the ranks (algo.balance_ranks; 1 = even); ranks/load_spread_before: as sampled",
    "rollout_corr/<stat>": "the sampler-vs-trainer mismatch, when the old log-probs are recomputed: ratio_mean, "
    "ratio_max, ratio_min, weight_mean, masked_frac, kl (algorithms.rollout_correction)",
    # the clipped update (losses.policy_loss, averaged over the update's micro-batches)
    "loss": "the policy loss (surrogate, plus beta * KL when the KL is in the loss), before the entropy bonus",
    "clip_frac": "share of real tokens whose ratio was clipped (also _low: below 1 - clip_low with A < 0, _high)",
    "ratio_mean": "mean importance ratio pi / pi_old over real tokens",
    "approx_kl": "k3 between the sampling and the current policy per token: how far the update moved",
    "entropy": "mean over sequences of the per-token entropy of the current policy",
    "grad_norm/actor": "gradient norm of the actor before clipping (grad_norm/critic for PPO's critic)",
    "optimizer_steps": "optimiser steps this step (passes x minibatches)",
    # cost (algorithms.compute)
    "compute/<model>_forward_tokens": "real tokens forwarded by actor, reference, critic, reward_model",
    "compute/<model>_backward_tokens": "real tokens backpropagated by actor and critic",
    "compute/flops": "2 x params per forward token + 4 x params per backward token, over the models run, counting "
    "real tokens with each prompt once per sequence (what the step needs, however it is run)",
    "compute/pass_<stat>": "what the decoder passes over prompt + completion (old log-probs, reference, training, "
    "critic, reward-model scores) really forwarded, counted as they ran: forward_tokens (padding included), "
    "real_tokens, padding_frac, prompt_repeats_avoided (real prompt tokens a shared prefill or a packed unit did "
    "not run again), flops (2 x, or 6 x with a backward, decoder params per forwarded token)",
    "time/<phase>": "wall seconds of a phase: generate, score, old_logp, reference, critic, train (cpu_time/ too)",
    # the loop (training.loop)
    "time/step": "wall seconds of the whole step",
    "lr": "the actor's learning rate at this step",
    "skipped_steps": "updates skipped this step for a non-finite loss or gradient norm",
    "oom/retries": "micro-batch halvings after out-of-memory this step (oom/micro_batch_size: the size now)",
    "memory/peak_rss_mb": "peak resident memory of the process (memory/peak_cuda_mb on CUDA)",
    "eval/<metric>": "the held-out eval: reward parts, lengths, format_rate, pass@1 (pass@k, maj@k with k > 1)",
}


def step_tensor_metrics(tensors: dict[str, Tensor], group_rewards: Tensor | None, group_size: int) -> dict[str, float]:
    """The shared metrics computed from the tensors one RL step trained on: `advantages` ([N] or [N, Tc]),
    `completion_mask` [N, Tc], `old_logp` and `ref_logp` [N, Tc] (the latter only with a reference), and the
    task rewards [N] (group-contiguous) for the zero-spread share."""
    mask = tensors["completion_mask"].float()  # [N, Tc]
    advantages = tensors["advantages"]
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(mask)  # [N, Tc]: a sequence's advantage on each of its tokens
    out = {
        "advantages/mean": float(masked_mean(advantages, mask)),
        "advantages/std": float(masked_var(advantages, mask).sqrt()),
        "advantages/abs_mean": float(masked_mean(advantages.abs(), mask)),
    }
    if "ref_logp" in tensors:
        k1 = (tensors["old_logp"] - tensors["ref_logp"]) * mask  # [N, Tc]
        out["kl"] = float(masked_mean(k1, mask))
        out["kl/sequence"] = float(k1.sum(-1).mean())
    if group_rewards is not None and group_size > 1:
        out["reward/zero_std_group_frac"] = zero_std_group_frac(group_rewards, group_size)
    return out
