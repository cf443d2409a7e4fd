"""RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
Human Feedback in LLMs"): REINFORCE with a leave-one-out baseline, no critic, the KL in the reward.

One `step()` reads top to bottom: rollout (G samples per prompt) -> score -> reference log-probs ->
sequence rewards r_i = score_i - beta * sum_t KL_t -> leave-one-out advantages A_i = r_i - mean of the
other G - 1 rewards of the prompt -> one pass of the policy loss with A_i on every token of sequence i.
What differs from GRPO: the baseline excludes the sample itself and nothing divides by a std (so A_i =
G / (G - 1) * (r_i - group mean): GRPO with scale_rewards=none, Dr. GRPO, times a constant), and the KL
is a penalty in the reward (PPO's place, TRL's RLOOTrainer), not a term in the loss. What differs from PPO: no critic;
the whole completion is one action with one advantage instead of per-token GAE.
With the defaults (one pass, one minibatch per rollout) the ratio is 1, the clip inactive, and the update
is the paper's REINFORCE gradient; TRL's per-sequence ratio only differs once num_iterations > 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.advantages import group_baseline
from algorithms.batch_stats import global_whiten
from algorithms.policy_gradient import PolicyGradient, PolicyGradientConfig, build_critic_free
from conf.checks import ConfigError
from conf.options import option
from conf.registry import register_stage
from data.loading import Batch
from training.loop import Built, StageContext, StepOutput
from training.timers import PhaseTimer


# ---- ALGO LOGIC: the estimator, pure functions of tensors ---------------------------------------
def kl_penalised_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """TRL's RLOO sequence reward: r_i = score_i - beta * sum_t KL_{i,t} over the real tokens.

    scores: [N] the reward functions' total; kl: [N, T] per-token KL estimate; mask: [N, T] 1 on real
    completion tokens (padding contributes nothing). Returns [N].
    """
    return scores - beta * (kl * mask.to(kl.dtype)).sum(-1)


def leave_one_out_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO's advantages A_i = r_i - (sum of the group's rewards - r_i) / (G - 1).

    rewards: [N] with N = P * G, group-contiguous (the G samples of one prompt adjacent). Returns [N]
    fp32; equal to G / (G - 1) * (r_i - group mean), so each group's advantages sum to 0.
    """
    return rewards.float() - group_baseline(rewards, group_size, "leave_one_out")


@dataclass
class RLOOConfig(PolicyGradientConfig):
    name: str = option("rloo", "the stage's name (algo=<name>)")
    # prompts_per_step 2 x group_size 4 (the base defaults, GRPO's): 8 sequences per step, PPO's budget
    # bnpo: every token weighs the same, so the gradient is a positive multiple of sum_i A_i grad log pi(y_i)
    # with log pi(y) = sum_t log pi(y_t), the paper's completion-as-one-action REINFORCE; grpo's per-sequence
    # token mean would scale sequence i by 1 / |y_i| (Dr. GRPO's length bias)
    loss_type: str = option(
        "bnpo", "how per-token losses are aggregated: grpo | bnpo | dr_grpo | dapo (bnpo: mean over all real tokens)"
    )
    # TRL's default is 0.05, but the summed penalty is PPO's (its return at the first token with
    # gamma = lam = 1), and PPO found that at 0.05 its noise was as large as the rewards' spread on the embedded
    # model; the leave-one-out baseline removes the group's shared KL, not each sample's own noise (a sum of
    # ~40 noisy k1 terms)
    beta: float = option(0.02, "KL coefficient: r_i = score_i - beta * sum_t KL_t; 0 = no reference")
    kl_in: str = option(
        "reward", "where beta * KL enters: reward (PPO's place: -beta * KL_t in the rewards) | loss (as GRPO)"
    )
    kl_estimator: str = option(
        "k1", "the per-token KL of the penalty: k1 | k2 | k3 (k1 = log pi/ref, as TRL's RLOOTrainer)"
    )
    # TRL's normalize_advantages, off by default there too
    whiten_advantages: bool = option(
        False,
        "advantages normalised to mean 0, std 1 over the whole batch's sequences (all ranks); on, the step size "
        "no longer scales with the rewards",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise ConfigError(
                f"algo.group_size={self.group_size}: RLOO's baseline is the mean of the other G - 1 "
                "samples of the same prompt; choose algo.group_size >= 2 (the budget is "
                "prompts_per_step x group_size sequences per step)"
            )


class RLOO(PolicyGradient):
    """The RLOO update on a policy, an optional frozen reference and a reward function."""

    cfg: RLOOConfig  # the algorithm's own options (PolicyGradient.__init__ stores the one it is given)

    def step(self, batch: Batch) -> StepOutput:
        cfg, timer = self.cfg, PhaseTimer()

        # ---- ROLLOUT AND SCORE: G samples per prompt, group-contiguous; reference log-probs -----
        rollout, scored, tensors = self.sample(batch, timer)
        mask = rollout.completion_mask  # [N, Tc]
        scores = scored.total.to(mask.device)  # [N]

        # ---- ALGO LOGIC: KL-penalised sequence rewards, leave-one-out baseline -----------------
        _, kl_penalty = self.kl_penalty(tensors)  # [N, Tc] each, 0 on padding and without a reference
        rewards = kl_penalised_rewards(scores, kl_penalty, mask, cfg.beta)  # [N]
        # groups never cross ranks (the sampler shards whole prompts): the baseline is local
        raw_advantages = leave_one_out_advantages(rewards, cfg.group_size)  # [N], one per sequence
        advantages = raw_advantages
        if cfg.whiten_advantages:  # with the statistics of the whole batch, over all ranks
            advantages = global_whiten(raw_advantages, torch.ones_like(raw_advantages))
        tensors["advantages"] = advantages  # [N]: the same advantage on every token of a sequence

        # ---- UPDATE: num_iterations passes over minibatches; the KL term only with kl_in=loss ------
        stats = self.update_policy(tensors, timer, beta_in_loss=self.loss_beta(cfg.beta))

        stats.update(self.kl_in_reward_metrics(kl_penalty, cfg.beta))
        return self.step_output(rollout, scored, scores, stats, timer, tensors)


@register_stage(
    "rloo",
    RLOOConfig,
    kind="rl",
    trains_policy=True,
    uses_rewards=True,
    objective="reward/total_mean",
    models=("reference",),
)
def build_rloo(ctx: StageContext) -> Built:
    """RLOO on ctx.policy with a frozen reference (none when beta = 0) and the actor's optimiser."""
    return build_critic_free(RLOO, ctx)
