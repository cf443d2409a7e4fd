"""Pieces of an RL step that PPO and GRPO share: timing, no-grad log-prob / value passes, the actor's
optimiser and reference, metrics."""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor

from algorithms.advantages import masked_mean
from algorithms.rollout import Rollout, generate_rollout
from algorithms.update import OptimTarget, build_optimizer
from conf.schema import TrainerConfig
from rewards.combine import RewardOutput
from models.logprobs import completion_logprobs
from models.lora import actor_parameters, is_lora, reference_view


class PhaseTimer:
    """Wall time and CPU time of this process per phase (generate, score, reference, train, ...), in seconds.

    CPU time is what a phase computed, whatever else the machine was running; on a shared CPU it is the
    steadier of the two (with one torch thread it is close to the wall time of an idle machine).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start
            self.cpu_seconds[phase] += time.process_time() - cpu_start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()} | {
            f"cpu_time/{k}": v for k, v in self.cpu_seconds.items()}


def sample_and_score(algo, rows: list[dict], samples_per_prompt: int, timer: PhaseTimer) -> tuple[Rollout, RewardOutput]:
    """Rollout then reward scoring, timed: the first half of every RL step, PPO's and GRPO's alike.

    `algo` supplies policy, tokenizer, reward_fn, generator and cfg (max_new_tokens, temperature, top_p).
    Returns (rollout, RewardOutput) with the N = len(rows) * samples_per_prompt samples group-contiguous.
    """
    cfg = algo.cfg
    with timer("generate"):
        # prompt_seeds: set by algorithms.distributed.ShardedAlgorithm, for samples independent of the layout
        rollout = generate_rollout(algo.policy, algo.tokenizer, rows, samples_per_prompt, cfg.max_new_tokens,
                                   cfg.temperature, cfg.top_p, algo.generator,
                                   prompt_seeds=getattr(algo, "prompt_seeds", None))
    with timer("score"):
        scored = algo.reward_fn(rollout.prompts, rollout.completions, rollout.rows)
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
    model: torch.nn.Module, micro: dict[str, Tensor], temperature: float, with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Completion log-probs of one (trimmed) micro-batch: ([n, Tc], entropy [n, Tc] | None)."""
    input_ids, attention_mask, tc = micro_inputs(micro)
    return completion_logprobs(model, input_ids, attention_mask, tc, temperature, with_entropy, entropy_grad)


def micro_values(critic: torch.nn.Module, micro: dict[str, Tensor]) -> Tensor:
    """Critic values of one micro-batch's completion tokens, [n, Tc] fp32 (see models.heads.ValueModel)."""
    return critic.values(*micro_inputs(micro))


@torch.no_grad()  # not inference_mode: FSDP's gathered weights made there could not be trained on later
def batched_forward(fn: Callable[[dict[str, Tensor]], Tensor], rollout: Rollout, micro_batch_size: int) -> Tensor:
    """fn(micro) -> [n, Tc] over the rollout in micro-batches, no grad: [N, Tc] fp32, 0 on padding."""
    batch = rollout_tensors(rollout)
    n, tc = rollout.completion_ids.shape
    out = torch.zeros(n, tc, dtype=torch.float32, device=rollout.completion_ids.device)
    for start in range(0, n, micro_batch_size):
        micro = {k: v[start : start + micro_batch_size] for k, v in batch.items()}
        out[start : start + micro_batch_size] = fn(micro)
    return out * rollout.completion_mask


def batched_logprobs(
    model: torch.nn.Module, rollout: Rollout, micro_batch_size: int, temperature: float
) -> Tensor:
    """Log-probs of the rollout's completions under `model` (reference or old policy), [N, Tc], no grad."""
    return batched_forward(lambda micro: micro_logprobs(model, micro, temperature)[0], rollout, micro_batch_size)


def actor_target(policy: torch.nn.Module, cfg: TrainerConfig, lr: float | None = None
                 ) -> tuple[OptimTarget, torch.optim.Optimizer]:
    """The policy's trainable parameters with their AdamW (lr: None = trainer.lr)."""
    params = actor_parameters(policy)  # under LoRA: the actor's adapter, not the critic's
    optimizer = build_optimizer(params, cfg, lr=lr)
    return OptimTarget(optimizer, params, cfg.max_grad_norm, "actor"), optimizer


def shard_models(cfg: TrainerConfig, policy: torch.nn.Module, reference: torch.nn.Module | None,
                 critic: torch.nn.Module | None = None) -> None:
    """Under trainer.strategy=fsdp, fully_shard the models in place (before their optimisers are built:
    sharding replaces the parameters); otherwise nothing."""
    if cfg.strategy != "fsdp":
        return
    from algorithms.fsdp import shard_critic, shard_policy

    device = next(policy.parameters()).device
    for model in (policy, reference):
        if model is not None:
            shard_policy(model, device)
    if critic is not None:
        shard_critic(critic, device)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy (the reference policy): eval mode, no gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def reference_model(policy: torch.nn.Module) -> torch.nn.Module:
    """The reference policy: under LoRA the shared base with adapters off, else a frozen copy."""
    return reference_view(policy) if is_lora(policy) else frozen_copy(policy)


def rollout_metrics(rollout: Rollout, rewards_total: Tensor, parts: dict[str, Tensor],
                    failures: dict[str, int]) -> dict[str, float]:
    """What every RL step logs about its samples and their rewards."""
    lengths = rollout.completion_lengths.float()
    metrics = {
        "reward/total_mean": float(rewards_total.mean()),
        "reward/total_std": float(rewards_total.std()) if rewards_total.numel() > 1 else 0.0,
        "completion/length_mean": float(lengths.mean()),
        "completion/length_max": float(lengths.max()),
        "completion/length_min": float(lengths.min()),
        "completion/truncated_frac": float(rollout.truncated.float().mean()),
        "tokens/generated": float(lengths.sum()),
    }
    for name, values in parts.items():
        metrics[f"reward/{name}_mean"] = float(values.mean())
        metrics[f"reward/{name}_std"] = float(values.std()) if values.numel() > 1 else 0.0
    for name, count in failures.items():
        metrics[f"reward/{name}_failures"] = float(count)
    return metrics


def sequence_mean(x: Tensor, mask: Tensor) -> float:
    """Mean over sequences of each sequence's token mean (how per-token diagnostics are reported)."""
    return float(masked_mean(x, mask, dim=1).mean())
