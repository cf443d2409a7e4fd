"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages, no critic, KL to the reference in the loss.

One `step()` reads top to bottom: rollout -> score -> group advantages -> reference log-probs ->
mu passes of clipped policy loss + beta * KL.
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.accounting import model_params, step_compute_metrics
from algorithms.common import (
    PhaseTimer,
    actor_target,
    batched_logprobs,
    reference_model,
    rollout_metrics,
    rollout_tensors,
    sample_and_score,
    sequence_mean,
    shard_models,
)
from algorithms.distributed import sharded_group_advantages
from algorithms.losses import accumulation_weight
from algorithms.objective import policy_objective
from algorithms.rollout import Rollout
from algorithms.update import OptimTarget, minibatch_update
from conf.schema import Config, GRPOConfig


class GRPO:
    """The GRPO update on a policy, an optional frozen reference and a reward function."""

    def __init__(self, cfg: GRPOConfig, policy, reference, tokenizer, reward_fn, targets: list[OptimTarget],
                 generator: torch.Generator):
        self.cfg = cfg
        self.policy = policy
        self.reference = reference  # None when beta == 0: no reference forward at all
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.targets = targets
        self.generator = generator
        self.params = model_params(policy, reference, reward_fn=reward_fn)

    @property
    def prompts_per_step(self) -> int:
        return self.cfg.prompts_per_step

    def checkpoint_models(self) -> dict[str, torch.nn.Module]:
        return {}  # the policy is saved by the trainer; GRPO has no other trained model

    def state_dict(self) -> dict:
        return {}  # nothing beyond the weights, optimiser and RNGs the trainer saves

    def load_state_dict(self, state: dict) -> None:
        pass

    def step(self, rows: list[dict]) -> tuple[dict[str, float], Rollout, dict[str, Tensor]]:
        cfg, timer = self.cfg, PhaseTimer()

        # ---- ROLLOUT AND SCORE: G samples per prompt, group-contiguous ------------------------
        rollout, scored = sample_and_score(self, rows, cfg.group_size, timer)
        mask = rollout.completion_mask  # [N, Tc]
        rewards = scored.total.to(mask.device)  # [N]

        # ---- ALGO LOGIC: group-normalised advantages -----------------------------------------
        advantages = sharded_group_advantages(rewards, cfg.group_size, cfg.scale_rewards, cfg.advantage_eps)  # [N]
        batch = rollout_tensors(rollout)
        batch["advantages"] = advantages
        if cfg.recompute_old_logp:  # otherwise the sampling-time log-probs are the old policy's
            with timer("old_logp"):
                batch["old_logp"] = batched_logprobs(self.policy, rollout, cfg.micro_batch_size, cfg.temperature)
        if self.reference is not None and cfg.beta > 0:
            with timer("reference"):
                batch["ref_logp"] = batched_logprobs(self.reference, rollout, cfg.micro_batch_size, cfg.temperature)

        def loss_fn(micro: dict[str, Tensor], share: float, minibatch_tokens: float):
            objective = policy_objective(self.policy, micro, cfg, minibatch_tokens,
                                         weight=accumulation_weight(cfg.loss_type, share), beta=cfg.beta)
            stats = objective.stats
            stats["entropy"] = torch.tensor(sequence_mean(objective.entropy, micro["completion_mask"]))
            stats["loss"] = objective.policy_loss
            return objective.loss, stats

        # ---- UPDATE: mu passes over minibatches ----------------------------------------------
        with timer("train"):
            self.policy.train()
            update_stats = minibatch_update(
                batch, loss_fn, self.targets, cfg.num_iterations, cfg.minibatch_size,
                cfg.micro_batch_size, self.generator,
            )
            self.policy.eval()

        metrics = rollout_metrics(rollout, rewards, scored.parts, scored.failures)
        metrics.update(update_stats)
        metrics.update(timer.metrics())
        metrics.update(step_compute_metrics(rollout, sum(scored.model_tokens.values()), self.params,
                                            cfg.num_iterations, cfg.recompute_old_logp))
        std_per_group = rewards.view(-1, cfg.group_size).std(dim=1) if cfg.group_size > 1 else rewards * 0
        metrics.update({
            "advantages/mean": float(advantages.mean()),
            "advantages/std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
            "advantages/abs_mean": float(advantages.abs().mean()),
            "reward/zero_std_group_frac": float((std_per_group == 0).float().mean()),
        })
        return metrics, rollout, {"total": rewards, **scored.parts}


def build_grpo(cfg: Config, policy, tokenizer, reward_fn, generator: torch.Generator
               ) -> tuple[GRPO, dict[str, torch.optim.Optimizer]]:
    """GRPO on `policy` with a frozen reference (none when beta = 0) and the actor's optimiser."""
    reference = reference_model(policy) if cfg.algo.beta > 0 else None
    shard_models(cfg.trainer, policy, reference)
    target, optimizer = actor_target(policy, cfg.trainer)
    return GRPO(cfg.algo, policy, reference, tokenizer, reward_fn, [target], generator), {"actor": optimizer}
