"""REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models"):
PPO's per-token rewards and tricks without a critic: returns-to-go, whitened over the whole batch.

One `step()` reads top to bottom: rollout -> score -> (baseline: the prompt's mean score subtracted) ->
reference log-probs -> per-token rewards (-beta * KL on every token, the score on the last one) ->
returns G_t = sum_{s >= t} gamma^(s - t) r_s -> advantages = the returns whitened over every real token
of the global batch -> num_iterations x minibatches of the clipped policy loss.
What differs from PPO: no critic, so the advantage is the whitened return instead of GAE on a learned
value (PPO with lam = 1 and a critic that is 0 everywhere); the rewards, the KL's place (the reward) and
the whitening are PPO's. What differs from GRPO: the KL is in the reward, the advantages are per token,
and the only normalisation is over the whole batch, never per prompt (so one sample per prompt works).
`baseline`: none = OpenRLHF's `reinforce` estimator (the paper's REINFORCE++); group_mean = its
`reinforce_baseline` (REINFORCE++-baseline: each score minus its prompt's mean score, G >= 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from algorithms.advantages import (
    discounted_returns,
    group_advantages,
    kl_penalised_token_rewards,
    masked_mean,
)
from algorithms.batch_stats import global_whiten
from algorithms.policy_gradient import PolicyGradient, PolicyGradientConfig, build_critic_free
from conf.checks import ConfigError, check_choice, check_range
from conf.options import option
from conf.registry import register_stage
from data.loading import Batch
from training.loop import Built, StageContext, StepOutput
from training.timers import PhaseTimer

BASELINES = ("none", "group_mean")


@dataclass
class ReinforcePPConfig(PolicyGradientConfig):
    name: str = option("reinforce_pp", "the stage's name (algo=<name>)")
    # prompts_per_step 2 x group_size 4 (the base defaults, GRPO's): 8 sequences per step whose G samples of a
    # prompt share one prefill, so a step costs GRPO's; 8 x 1 (the paper's one sample per prompt:
    # algo.prompts_per_step=8 algo.group_size=1) measured ~2x slower on the embedded model (8 prefills, no
    # shared prompt in the reference and training passes)
    baseline: str = option(
        "none", "none (REINFORCE++) | group_mean (REINFORCE++-baseline: score - the prompt's mean score)"
    )
    loss_type: str = option(
        "bnpo",
        "how per-token losses are aggregated: grpo | bnpo | dr_grpo | dapo (bnpo: mean over all real tokens, as the "
        "advantages are whitened per token: OpenRLHF, PPO)",
    )
    # PPO's rewards and PPO's value: at 0.05 the penalty's noise was as large as the rewards' spread on the
    # embedded model
    beta: float = option(
        0.02, "KL coefficient: reward_t = -beta * KL_t, + the score at the last token; 0 = no reference"
    )
    kl_in: str = option(
        "reward", "where beta * KL enters: reward (PPO's place: -beta * KL_t in the rewards) | loss (as GRPO)"
    )
    kl_estimator: str = option(
        "k1", "the per-token KL of the penalty: k1 | k2 | k3 (k1 = log pi/ref, as in PPO and the paper)"
    )
    gamma: float = option(1.0, "per-token discount of the returns, in [0, 1]")
    whiten_advantages: bool = option(
        True,
        "the returns normalised to mean 0, std 1 over the global batch's real tokens (all ranks): REINFORCE++'s "
        "only baseline when baseline=none; false = the raw returns",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("algo.baseline", self.baseline, BASELINES)
        check_range("algo.gamma", self.gamma, 0.0, 1.0)
        if self.baseline == "group_mean" and self.group_size < 2:
            raise ConfigError(
                f"algo.baseline=group_mean with algo.group_size={self.group_size}: the baseline is the "
                "mean score of the prompt's samples; choose algo.group_size >= 2 (and "
                "algo.prompts_per_step to keep the budget, e.g. 2 x 4)"
            )


class ReinforcePP(PolicyGradient):
    """The REINFORCE++ update on a policy, an optional frozen reference and a reward function."""

    cfg: ReinforcePPConfig  # the algorithm's own options (PolicyGradient.__init__ stores the one it is given)

    def step(self, batch: Batch) -> StepOutput:
        cfg, timer = self.cfg, PhaseTimer()

        # ---- ROLLOUT AND SCORE: one reward per sequence; reference log-probs -----------------
        rollout, scored, tensors = self.sample(batch, timer)
        mask = rollout.completion_mask  # [N, Tc]
        scores = scored.total.to(mask.device)  # [N]

        # ---- ALGO LOGIC: (baseline), per-token rewards, returns, global whitening ----------------
        # groups never cross ranks (the sampler shards whole prompts): the group mean is local
        centred = group_advantages(scores, cfg.group_size, "none") if cfg.baseline == "group_mean" else scores  # [N]
        _, kl_penalty = self.kl_penalty(tensors)  # [N, Tc] each, 0 on padding and without a reference
        token_rewards = kl_penalised_token_rewards(centred, kl_penalty, mask, cfg.beta)  # [N, Tc]
        returns = discounted_returns(token_rewards, mask, cfg.gamma)  # [N, Tc]
        # whitened with the statistics of the whole batch, over all ranks
        advantages = global_whiten(returns, mask) if cfg.whiten_advantages else returns  # [N, Tc]
        tensors["advantages"] = advantages

        # ---- UPDATE: num_iterations passes over minibatches; the KL term only with kl_in=loss ------
        stats = self.update_policy(tensors, timer, beta_in_loss=self.loss_beta(cfg.beta))

        stats["returns/mean"] = float(masked_mean(returns, mask))  # PPO's key: its lam = 1 returns are these
        stats.update(self.kl_in_reward_metrics(kl_penalty, cfg.beta))
        return self.step_output(rollout, scored, scores, stats, timer, tensors)


@register_stage(
    "reinforce_pp",
    ReinforcePPConfig,
    kind="rl",
    trains_policy=True,
    uses_rewards=True,
    objective="reward/total_mean",
    models=("reference",),
)
def build_reinforce_pp(ctx: StageContext) -> Built:
    """REINFORCE++ on ctx.policy with a frozen reference (none when beta = 0) and the actor's optimiser."""
    return build_critic_free(ReinforcePP, ctx)
