"""PPO for LLMs (Ziegler et al. 2019; Ouyang et al. 2022): actor, critic, reward, frozen reference.

One `step()` reads top to bottom: rollout -> score -> reference log-probs and critic values ->
per-token rewards (-beta * KL on every token, the sequence reward on the last one) -> GAE ->
num_iterations x minibatches of clipped policy loss + vf_coef * clipped value loss.
Rollout, scoring, log-probs, the policy loss and the minibatch loop are GRPO's; what differs is the
advantage estimator (GAE on a learned critic) and where the KL enters (the reward, not the loss).
Both are options, so that PPO and GRPO are corners of one grid: `baseline=group_mean|leave_one_out` (with
group_size G >= 2) replaces the critic's V(s_t) by the mean of the prompt's G (or other G - 1) sequence
returns, and no critic is built; `kl_in=loss` moves beta * KL from the rewards into the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.advantages import (
    GROUP_BASELINES,
    explained_variance,
    gae,
    group_baselined_returns,
    kl_penalised_token_rewards,
    masked_mean,
)
from algorithms.batch_stats import global_whiten
from algorithms.common import batched_forward, micro_values
from algorithms.kl_control import KLController
from algorithms.losses import value_loss
from algorithms.objective import policy_micro_loss
from algorithms.policy_gradient import PolicyGradient, PolicyGradientConfig, build_actor_and_reference
from conf.checks import ConfigError, check_choice, check_range
from conf.options import option
from conf.registry import register_stage
from data.loading import Batch, PromptSampler
from models.heads import ValueModel
from models.lora import add_critic_adapter, is_lora
from parallel.distributed import all_mean, world_size
from training.loop import Built, StageContext, StepOutput
from training.timers import PhaseTimer
from training.update import MicroShare, minibatch_update, optim_target


@dataclass
class PPOConfig(PolicyGradientConfig):
    name: str = option("ppo", "the stage's name (algo=<name>)")
    # 8 x 1 = GRPO's default 2 x 4 sequences: the same budget
    prompts_per_step: int = option(8, "P: prompts per RL step")
    group_size: int = option(1, "G: completions per prompt; N = P * G sequences per step")
    loss_type: str = option(
        "bnpo", "how per-token losses are aggregated: grpo | bnpo | dr_grpo | dapo (bnpo, PPO's: mean over all tokens)"
    )
    # the penalty's noise is in every advantage: at 0.05 it was as large as the rewards' spread
    beta: float = option(
        0.02,
        "(initial) KL coefficient: reward_t = -beta * KL_t, + the sequence reward at the last token; 0 = no reference",
    )
    kl_estimator: str = option(
        "k1", "the per-token KL of the penalty: k1 | k2 | k3 (k1 = log pi/ref, as in Ziegler et al.)"
    )
    vf_coef: float = option(0.1, "weight of the value loss in actor + critic loss")
    value_clip: float = option(0.2, "new values clipped to old values +- value_clip in the value loss")
    gamma: float = option(1.0, "per-token discount, in [0, 1]")
    lam: float = option(
        1.0, "GAE lambda, in [0, 1] (1 = Monte Carlo returns: no bias from a critic that is still untrained)"
    )
    whiten_advantages: bool = option(True, "advantages normalised to mean 0, std 1 over the batch's real tokens")
    kl_control: str = option("fixed", "fixed | adaptive (Ziegler et al. 2019: beta moves toward target_kl)")
    target_kl: float = option(6.0, "kl_control=adaptive: target KL per sequence, in nats")
    kl_horizon: int = option(10000, "kl_control=adaptive: horizon, in sequences (larger = slower beta changes)")
    kl_in: str = option(
        "reward", "where beta * KL enters: reward (PPO's: -beta * KL_t in every token's reward) | loss (as GRPO)"
    )
    baseline: str = option(
        "critic",
        "critic (a learned value per token, GAE) | group_mean | leave_one_out (the mean of the prompt's G, or "
        "other G - 1, sequence returns in place of V(s_t); no critic is built)",
    )
    critic: str = option(
        "policy", "critic initialisation: policy (a copy of the policy's backbone + a zero value head)"
    )
    critic_lr: float | None = option(
        2e-4, "the critic's AdamW learning rate (null = trainer.lr); higher, so a fresh head catches up"
    )
    actor_lr: float | None = option(1e-4, "the actor's AdamW learning rate (null = trainer.lr)")
    default_max_steps: int | None = option(
        24, "trainer.max_steps when it is not given; fewer than GRPO's: a PPO step costs ~2x (critic passes)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("algo.kl_control", self.kl_control, ("fixed", "adaptive"))
        check_choice("algo.critic", self.critic, ("policy",))
        check_choice("algo.baseline", self.baseline, ("critic", *GROUP_BASELINES))
        if self.baseline != "critic" and self.group_size < 2:
            raise ConfigError(
                f"algo.baseline={self.baseline} with algo.group_size={self.group_size}: a group "
                "baseline needs algo.group_size >= 2 samples per prompt (e.g. algo.prompts_per_step=2 "
                "algo.group_size=4 keeps the 8 sequences per step)"
            )
        check_range("algo.kl_horizon", self.kl_horizon, 1)
        check_range("algo.gamma", self.gamma, 0.0, 1.0)
        check_range("algo.lam", self.lam, 0.0, 1.0)
        for key in ("vf_coef", "value_clip", "target_kl"):
            check_range(f"algo.{key}", getattr(self, key), 0.0)
        for key in ("critic_lr", "actor_lr"):
            if getattr(self, key) is not None:
                check_range(f"algo.{key}", getattr(self, key), 0.0)


class PPO(PolicyGradient):
    """The PPO update on a policy, its critic, an optional frozen reference and a reward function."""

    cfg: PPOConfig  # the algorithm's own options (PolicyGradient.__init__ stores the one it is given)

    def __init__(
        self, cfg: PPOConfig, ctx: StageContext, reference, targets, critic: ValueModel | None, kl_ctl: KLController
    ):
        super().__init__(cfg, ctx, reference, targets, critic)
        self.kl_ctl = kl_ctl

    def state_dict(self) -> dict:
        # the adaptive beta (critic weights: checkpoint_models)
        return {**super().state_dict(), "kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    def step(self, batch: Batch) -> StepOutput:
        cfg, timer = self.cfg, PhaseTimer()

        # ---- ROLLOUT AND SCORE: one reward per sequence; reference log-probs -----------------
        rollout, scored, tensors = self.sample(batch, timer)
        mask = rollout.completion_mask  # [N, Tc]
        N = mask.shape[0]
        scores = scored.total.to(mask.device)  # [N]

        # ---- OLD VALUES (no grad; with a critic) ----------------------------------------------
        old_values = None
        if (critic := self.critic) is not None:
            with timer("critic"):
                old_values = batched_forward(
                    lambda micro: micro_values(critic, micro), rollout, self.micro_batch
                )  # [N, Tc]

        # ---- ALGO LOGIC: per-token rewards, GAE (or a group baseline), whitening ----------------
        beta = self.kl_ctl.value
        kl_k1, kl_penalty = self.kl_penalty(tensors)  # [N, Tc] each; the penalty is 0 with kl_in=loss
        token_rewards = kl_penalised_token_rewards(scores, kl_penalty, mask, beta)  # [N, Tc]
        if old_values is not None:
            raw_advantages, returns = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)  # [N, Tc] each
        else:  # G_t - the group baseline of the sequence returns: GAE with lam = 1 and V(s_t) = b per prompt
            raw_advantages, returns = group_baselined_returns(
                token_rewards, mask, cfg.group_size, cfg.baseline, cfg.gamma
            )  # [N, Tc] each
        # whitened with the statistics of the whole batch, over all ranks
        advantages = global_whiten(raw_advantages, mask) if cfg.whiten_advantages else raw_advantages
        tensors.update(advantages=advantages, returns=returns)
        if old_values is not None:
            tensors["old_values"] = old_values

        def loss_fn(micro: dict[str, Tensor], share: MicroShare):
            # a KL term only with kl_in=loss (by default the KL is in the rewards)
            loss, stats = policy_micro_loss(self.policy, micro, cfg, share, self.loss_beta(beta))
            assert self.critic is not None  # the value loss is only trained with a critic
            values = micro_values(self.critic, micro)  # [n, Tc]
            v_loss, v_stats = value_loss(
                values, micro["old_values"], micro["returns"], micro["completion_mask"], cfg.value_clip
            )
            stats.update(v_stats)
            stats["value_loss"] = v_loss.detach()
            return loss + cfg.vf_coef * v_loss * share.token_mean, stats

        # ---- UPDATE: num_iterations passes over minibatches, actor and critic together ----------
        if self.critic is None:  # a group baseline: the policy loss alone, as the critic-free algorithms
            stats = self.update_policy(tensors, timer, beta_in_loss=self.loss_beta(beta))
        else:
            with timer("train"):
                self.policy.train()
                self.critic.train()
                stats = minibatch_update(
                    tensors,
                    loss_fn,
                    self.targets,
                    cfg.num_iterations,
                    cfg.minibatch_size,
                    self.micro_batch,
                    self.generator,
                )
                self.policy.eval()
                self.critic.eval()

        kl_per_sequence = float(kl_k1.sum(-1).mean())  # nats per sequence, Ziegler's KL (logged as kl/sequence)
        # every rank updates the coefficient with the whole batch's KL, so they stay equal
        self.kl_ctl.update(all_mean(kl_per_sequence), N * world_size())

        stats.update(
            {
                "returns/mean": float(masked_mean(returns, mask)),
                "kl_coef": beta,  # the beta this step's rewards (or loss) used
            }
        )
        if old_values is not None:
            # undefined (NaN) when the returns do not vary, e.g. every completion empty with equal rewards:
            # logged as 0, "no better than a constant", so that no NaN reaches the logs
            explained = explained_variance(old_values, returns, mask)
            stats["values/mean"] = float(masked_mean(old_values, mask))
            stats["explained_var"] = float(explained) if torch.isfinite(explained) else 0.0
        stats.update(self.kl_in_reward_metrics(kl_penalty, beta))
        return self.step_output(rollout, scored, scores, stats, timer, tensors)


def ppo_models(cfg: PPOConfig) -> tuple[str, ...]:
    """The models PPO keeps besides the actor: the reference, and the critic unless a group baseline replaces it."""
    return ("reference", "critic") if cfg.baseline == "critic" else ("reference",)


@register_stage(
    "ppo", PPOConfig, kind="rl", trains_policy=True, uses_rewards=True, objective="reward/total_mean", models=ppo_models
)
def build_ppo(ctx: StageContext) -> Built:
    """PPO's four models: the policy (actor), a critic from the policy's weights (none with a group
    baseline), a frozen reference (none when beta = 0) and the reward function; the actor and the critic
    get their own AdamW."""
    cfg, algo = ctx.cfg, ctx.cfg.algo
    assert ctx.policy is not None  # a looped stage's context always has the policy (run.py)
    critic = None
    if "critic" in ppo_models(algo):
        if is_lora(ctx.policy):  # a second adapter on the same frozen base, a zero head
            critic = ValueModel(add_critic_adapter(ctx.policy))
        else:  # algo.critic == "policy": a copy of the policy's backbone, a zero head
            critic = ValueModel.from_causal_lm(ctx.policy)
    reference, actor, actor_optimizer = build_actor_and_reference(ctx, lr=algo.actor_lr, critic=critic)
    targets, optimizers = [actor], {"actor": actor_optimizer}
    if critic is not None:
        critic_target, optimizers["critic"] = optim_target(
            [p for p in critic.parameters() if p.requires_grad], cfg.trainer, "critic", lr=algo.critic_lr
        )
        targets.append(critic_target)
        critic = critic.eval()
    kl_ctl = KLController(algo.beta, algo.kl_control == "adaptive", algo.target_kl, algo.kl_horizon)
    ppo = PPO(algo, ctx, reference, targets, critic, kl_ctl)
    return Built(ppo, optimizers, PromptSampler(ctx.train_rows, algo.prompts_per_step, cfg.seed))
