"""Pieces of an RL step every algorithm shares: sampling + scoring, the rollout as tensors, no-grad
log-prob / value passes over it in micro-batches, and the metrics every step logs about its samples."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from algorithms.advantages import masked_mean
from algorithms.rollout import Rollout, generate_rollout
from models.heads import ValueModel
from models.logprobs import completion_logprobs
from rewards.combine import RewardOutput
from rewards.reasoning import reasoning_stats
from training.timers import PhaseTimer
from training.update import MicroBatch


def sample_and_score(
    policy,
    tokenizer,
    reward_fn,
    rows: list[dict],
    seeds: list[int] | None,
    cfg,
    generator: torch.Generator | None,
    timer: PhaseTimer,
) -> tuple[Rollout, RewardOutput]:
    """Rollout then reward scoring, timed: the first half of every RL step.

    cfg: the algorithm's config (group_size, max_new_tokens, temperature, top_p, rollout). `seeds`: one sampling
    seed per row (prompt-seeded sampling, parallel.distributed.ShardedSampler), else None and `generator`
    draws. Returns (rollout, RewardOutput) with the N = len(rows) * group_size samples group-contiguous.
    """
    with timer("generate"):
        rollout = generate_rollout(
            policy,
            tokenizer,
            rows,
            cfg.group_size,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_p,
            generator,
            prompt_seeds=seeds,
            rollout=cfg.rollout,
        )
    with timer("score"):
        scored = reward_fn(rollout.prompts, rollout.completions, rollout.rows)
    return rollout, scored


def rollout_tensors(rollout: Rollout) -> dict[str, Tensor]:
    """The rollout as a dict of [N, ...] tensors, the form minibatch_update slices."""
    return {
        "prompt_ids": rollout.prompt_ids,
        "prompt_mask": rollout.prompt_mask,
        "completion_ids": rollout.completion_ids,
        "completion_mask": rollout.completion_mask,
        "old_logp": rollout.logp,
    }


def micro_inputs(micro: dict[str, Tensor]) -> tuple[Tensor, Tensor, int]:
    """(input_ids [n, Tp + Tc], attention_mask [n, Tp + Tc], Tc) of one micro-batch of rollout tensors."""
    input_ids = torch.cat([micro["prompt_ids"], micro["completion_ids"]], dim=1)
    attention_mask = torch.cat([micro["prompt_mask"], micro["completion_mask"]], dim=1)
    return input_ids, attention_mask, micro["completion_ids"].shape[1]


def micro_logprobs(
    model: torch.nn.Module,
    micro: dict[str, Tensor],
    temperature: float,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Completion log-probs of one (trimmed) micro-batch: ([n, Tc], entropy [n, Tc] | None)."""
    input_ids, attention_mask, tc = micro_inputs(micro)
    return completion_logprobs(model, input_ids, attention_mask, tc, temperature, with_entropy, entropy_grad)


def micro_values(critic: ValueModel, micro: dict[str, Tensor]) -> Tensor:
    """Critic values of one micro-batch's completion tokens, [n, Tc] fp32 (see models.heads.ValueModel)."""
    return critic.values(*micro_inputs(micro))


@torch.no_grad()  # not inference_mode: FSDP's gathered weights made there could not be trained on later
def batched_forward(
    fn: Callable[[dict[str, Tensor]], Tensor], rollout: Rollout, micro_batch: MicroBatch | int
) -> Tensor:
    """fn(micro) -> [n, Tc] over the rollout in micro-batches (`MicroBatch.split`: by count, or balanced by
    tokens), no grad: [N, Tc] fp32, 0 on padding."""
    if isinstance(micro_batch, int):
        micro_batch = MicroBatch(micro_batch)
    batch = rollout_tensors(rollout)
    n, tc = rollout.completion_ids.shape
    out = torch.zeros(n, tc, dtype=torch.float32, device=rollout.completion_ids.device)
    for idx in micro_batch.split(batch, torch.arange(n, device=out.device)):
        out[idx] = fn({k: v[idx] for k, v in batch.items()})
    return out * rollout.completion_mask


def batched_logprobs(
    model: torch.nn.Module, rollout: Rollout, micro_batch: MicroBatch | int, temperature: float
) -> Tensor:
    """Log-probs of the rollout's completions under `model` (reference or old policy), [N, Tc], no grad."""
    return batched_forward(lambda micro: micro_logprobs(model, micro, temperature)[0], rollout, micro_batch)


def rollout_metrics(
    rollout: Rollout,
    rewards_total: Tensor,
    parts: dict[str, Tensor],
    failures: dict[str, int],
    timeouts: dict[str, int] | None = None,
) -> dict[str, float]:
    """What every RL step logs about its samples and their rewards."""
    lengths = rollout.completion_lengths.float()
    metrics = {
        "reward/total_mean": float(rewards_total.mean()),
        "reward/total_std": float(rewards_total.std()) if rewards_total.numel() > 1 else 0.0,
        "completion/length_mean": float(lengths.mean()),
        "completion/length_max": float(lengths.max()),
        "completion/length_min": float(lengths.min()),
        "completion/truncated_frac": float(rollout.truncated.float().mean()),
        "completion/eos_frac": 1.0 - float(rollout.truncated.float().mean()),  # stopped by EOS, not the budget
        "tokens/generated": float(lengths.sum()),
    }
    # median words in the think block, share re-checking itself ("wait", "let me check"): R1's "aha" signs
    metrics.update({f"completion/{k}": v for k, v in reasoning_stats(rollout.prompts, rollout.completions).items()})
    for name, values in parts.items():
        metrics[f"reward/{name}_mean"] = float(values.mean())
        metrics[f"reward/{name}_std"] = float(values.std()) if values.numel() > 1 else 0.0
    for name, count in failures.items():
        metrics[f"reward/{name}_failures"] = float(count)
    for name, count in (timeouts or {}).items():  # only with reward.timeout_s
        metrics[f"reward/{name}_timeouts"] = float(count)
    return metrics


def sequence_mean(x: Tensor, mask: Tensor) -> float:
    """Mean over sequences of each sequence's token mean (how per-token diagnostics are reported)."""
    return float(masked_mean(x, mask, dim=1).mean())


def zero_std_group_frac(rewards: Tensor, group_size: int) -> float:
    """Share of prompts whose G rewards are all equal (a group of one counts as such): groups that give a
    group-relative estimator no signal. rewards: [N] group-contiguous."""
    if group_size == 1:
        return 1.0
    return float((rewards.view(-1, group_size).std(dim=1) == 0).float().mean())
