"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages, no critic, KL to the reference in the loss.

One `step()` reads top to bottom: rollout -> score -> group advantages -> (reference log-probs) ->
mu passes of clipped policy loss + beta * KL.
"""

from __future__ import annotations

from dataclasses import dataclass

from algorithms.batch_stats import sharded_group_advantages
from algorithms.common import zero_std_group_frac
from algorithms.policy_gradient import PolicyGradient, PolicyGradientConfig, build_critic_free
from conf.checks import check_choice, check_range
from conf.registry import register_stage
from data.loading import Batch
from training.loop import Built, StageContext, StepOutput
from training.timers import PhaseTimer


@dataclass
class GRPOConfig(PolicyGradientConfig):
    name: str = "grpo"
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO: no std division)
    advantage_eps: float = 1e-4  # added to the std before dividing

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("algo.scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        check_range("algo.advantage_eps", self.advantage_eps, 0.0)


class GRPO(PolicyGradient):
    """The GRPO update on a policy, an optional frozen reference and a reward function."""

    def step(self, batch: Batch) -> StepOutput:
        cfg, timer = self.cfg, PhaseTimer()

        # ---- ROLLOUT AND SCORE: G samples per prompt, group-contiguous; reference log-probs -----
        rollout, scored, tensors = self.sample(batch, timer)
        rewards = scored.total.to(rollout.completion_mask.device)  # [N]

        # ---- ALGO LOGIC: group-normalised advantages -----------------------------------------
        advantages = sharded_group_advantages(rewards, cfg.group_size, cfg.scale_rewards, cfg.advantage_eps)  # [N]
        tensors["advantages"] = advantages

        # ---- UPDATE: mu passes over minibatches, beta * KL in the loss -------------------------
        stats = self.update_policy(tensors, timer, beta_in_loss=cfg.beta if self.reference is not None else 0.0)

        stats.update({
            "advantages/mean": float(advantages.mean()),
            "advantages/std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
            "advantages/abs_mean": float(advantages.abs().mean()),
            "reward/zero_std_group_frac": zero_std_group_frac(rewards, cfg.group_size),
        })
        return self.step_output(rollout, scored, rewards, stats, timer)


@register_stage("grpo", GRPOConfig, kind="rl", trains_policy=True, uses_rewards=True,
                objective="reward/total_mean", models=("reference",))
def build_grpo(ctx: StageContext) -> Built:
    """GRPO on ctx.policy with a frozen reference (none when beta = 0) and the actor's optimiser."""
    return build_critic_free(GRPO, ctx)
