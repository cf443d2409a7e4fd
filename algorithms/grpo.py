"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages, no critic, KL to the reference in the loss.

One `step()` reads top to bottom: rollout -> score -> group advantages -> (reference log-probs) ->
mu passes of clipped policy loss + beta * KL. `kl_in=reward` moves the KL to PPO's place instead (a
per-token penalty in the rewards, so the advantages become per token), one corner of the PPO-GRPO grid.
"""

from __future__ import annotations

from dataclasses import dataclass

from algorithms.advantages import group_baselined_returns, kl_penalised_token_rewards, sequence_returns
from algorithms.batch_stats import sharded_group_advantages, sharded_group_scale
from algorithms.policy_gradient import PolicyGradient, PolicyGradientConfig, build_critic_free
from conf.checks import check_choice, check_range
from conf.options import option
from conf.registry import register_stage
from data.loading import Batch
from training.loop import Built, StageContext, StepOutput
from training.timers import PhaseTimer


@dataclass
class GRPOConfig(PolicyGradientConfig):
    name: str = option("grpo", "the stage's name (algo=<name>)")
    scale_rewards: str = option(
        "group",
        "the std the group-centred rewards are divided by: group (the prompt's G rewards) | batch (the step's) "
        "| none (Dr. GRPO: no std division)",
    )
    advantage_eps: float = option(1e-4, "added to that std before dividing")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("algo.scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        check_range("algo.advantage_eps", self.advantage_eps, 0.0)


class GRPO(PolicyGradient):
    """The GRPO update on a policy, an optional frozen reference and a reward function."""

    cfg: GRPOConfig  # the algorithm's own options (PolicyGradient.__init__ stores the one it is given)

    def step(self, batch: Batch) -> StepOutput:
        cfg, timer = self.cfg, PhaseTimer()

        # ---- ROLLOUT AND SCORE: G samples per prompt, group-contiguous; reference log-probs -----
        rollout, scored, tensors = self.sample(batch, timer)
        rewards = scored.total.to(rollout.completion_mask.device)  # [N]

        # ---- ALGO LOGIC: group-normalised advantages -----------------------------------------
        _, kl_penalty = self.kl_penalty(tensors)  # [N, Tc] each; the penalty is 0 unless kl_in=reward
        if cfg.kl_in == "reward" and self.reference is not None:
            # the KL as PPO places it, -beta * KL_t in every token's reward: returns-to-go less the group mean of
            # the sequence returns, over their group std (at the first token: GRPO on score - beta * sum_t KL_t)
            mask = rollout.completion_mask  # [N, Tc]
            token_rewards = kl_penalised_token_rewards(rewards, kl_penalty, mask, cfg.beta)  # [N, Tc]
            centred, returns = group_baselined_returns(token_rewards, mask, cfg.group_size, "group_mean")
            scale = sharded_group_scale(
                sequence_returns(returns, mask), cfg.group_size, cfg.scale_rewards, cfg.advantage_eps
            )  # [N]
            advantages = centred / scale[:, None]  # [N, Tc]
        else:
            advantages = sharded_group_advantages(rewards, cfg.group_size, cfg.scale_rewards, cfg.advantage_eps)  # [N]
        tensors["advantages"] = advantages

        # ---- UPDATE: mu passes over minibatches, beta * KL in the loss (kl_in=loss) --------------
        stats = self.update_policy(tensors, timer, beta_in_loss=self.loss_beta(cfg.beta))

        stats.update(self.kl_in_reward_metrics(kl_penalty, cfg.beta))
        return self.step_output(rollout, scored, rewards, stats, timer, tensors)


@register_stage(
    "grpo",
    GRPOConfig,
    kind="rl",
    trains_policy=True,
    uses_rewards=True,
    objective="reward/total_mean",
    models=("reference",),
)
def build_grpo(ctx: StageContext) -> Built:
    """GRPO on ctx.policy with a frozen reference (none when beta = 0) and the actor's optimiser."""
    return build_critic_free(GRPO, ctx)
