"""PPO for LLMs (Ziegler et al. 2019; Ouyang et al. 2022): actor, critic, reward, frozen reference.

One `step()` reads top to bottom: rollout -> score -> reference log-probs and critic values ->
per-token rewards (-beta * KL on every token, the sequence reward on the last one) -> GAE ->
ppo_epochs x minibatches of clipped policy loss + vf_coef * clipped value loss.
Rollout, scoring, log-probs, the policy loss and the minibatch loop are GRPO's; what differs is the
advantage estimator (GAE on a learned critic) and where the KL enters (the reward, not the loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

from algorithms.accounting import model_params, step_compute_metrics
from algorithms.advantages import explained_variance, gae, masked_mean, masked_var
from algorithms.common import (
    PhaseTimer,
    actor_target,
    batched_forward,
    batched_logprobs,
    micro_values,
    reference_model,
    rollout_metrics,
    rollout_tensors,
    sample_and_score,
    sequence_mean,
    shard_models,
)
from algorithms.distributed import all_mean, global_whiten, world_size
from algorithms.kl_control import KLController
from algorithms.losses import accumulation_weight, kl_estimate, value_loss
from algorithms.objective import policy_objective
from algorithms.rollout import Rollout
from algorithms.update import OptimTarget, build_optimizer, minibatch_update
from conf.schema import Config, PPOConfig
from models.heads import ValueModel
from models.lora import add_critic_adapter, is_lora


class PPO:
    """The PPO update on a policy, its critic, an optional frozen reference and a reward function."""

    def __init__(self, cfg: PPOConfig, policy, critic: ValueModel, reference, tokenizer, reward_fn,
                 targets: list[OptimTarget], generator: torch.Generator, kl_ctl: KLController):
        self.cfg = cfg
        self.policy = policy
        self.critic = critic
        self.reference = reference  # None when beta == 0: no penalty, no reference forward
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.targets = targets  # the actor's and the critic's optimisers, stepped together
        self.generator = generator
        self.kl_ctl = kl_ctl
        self.params = model_params(policy, reference, critic, reward_fn)

    @property
    def prompts_per_step(self) -> int:
        return self.cfg.prompts_per_step

    def checkpoint_models(self) -> dict[str, torch.nn.Module]:
        return {"critic": self.critic}

    def state_dict(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict()}  # the adaptive beta (critic weights: checkpoint_models)

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    def step(self, rows: list[dict]) -> tuple[dict[str, float], Rollout, dict[str, Tensor]]:
        cfg, timer = self.cfg, PhaseTimer()

        # ---- ROLLOUT AND SCORE: one reward per sequence ---------------------------------------
        rollout, scored = sample_and_score(self, rows, cfg.samples_per_prompt, timer)
        mask = rollout.completion_mask  # [N, Tc]
        N = mask.shape[0]
        scores = scored.total.to(mask.device)  # [N]

        # ---- REFERENCE LOG-PROBS AND OLD VALUES (no grad) ------------------------------------
        batch = rollout_tensors(rollout)
        if cfg.recompute_old_logp:  # otherwise the sampling-time log-probs are the old policy's
            with timer("old_logp"):
                batch["old_logp"] = batched_logprobs(self.policy, rollout, cfg.micro_batch_size, cfg.temperature)
        kl_k1 = kl_penalty = torch.zeros_like(batch["old_logp"])  # [N, Tc]
        if self.reference is not None:
            with timer("reference"):
                ref_logp = batched_logprobs(self.reference, rollout, cfg.micro_batch_size, cfg.temperature)
            kl_k1 = (batch["old_logp"] - ref_logp) * mask
            kl_penalty = kl_estimate(batch["old_logp"], ref_logp, cfg.kl_estimator) * mask
        with timer("critic"):
            old_values = batched_forward(lambda micro: micro_values(self.critic, micro), rollout,
                                         cfg.micro_batch_size)  # [N, Tc]

        # ---- ALGO LOGIC: per-token rewards, GAE, whitening -----------------------------------
        beta = self.kl_ctl.value
        token_rewards = -beta * kl_penalty  # [N, Tc]
        last = mask.sum(-1) - 1  # index of each completion's last real token (EOS or the cut), [N]
        token_rewards[torch.arange(N, device=mask.device), last] += scores
        raw_advantages, returns = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)  # [N, Tc] each
        # whitened with the statistics of the whole batch, over all ranks
        advantages = global_whiten(raw_advantages, mask) if cfg.whiten_advantages else raw_advantages
        batch.update(advantages=advantages, returns=returns, old_values=old_values)

        def loss_fn(micro: dict[str, Tensor], share: float, minibatch_tokens: float):
            micro_mask = micro["completion_mask"]
            # no KL term here: PPO's KL is already in the rewards; dapo's policy loss is already divided by
            # the minibatch's tokens, the token means are not
            objective = policy_objective(self.policy, micro, cfg, minibatch_tokens,
                                         weight=accumulation_weight(cfg.loss_type, share),
                                         entropy_weight=cfg.ent_coef * share)
            values = micro_values(self.critic, micro)  # [n, Tc]
            v_loss, v_stats = value_loss(values, micro["old_values"], micro["returns"], micro_mask, cfg.value_clip)
            entropy_bonus = masked_mean(objective.entropy, micro_mask)
            stats = objective.stats
            stats.update(v_stats)
            stats["pg_loss"] = objective.policy_loss
            stats["value_loss"] = v_loss.detach()
            stats["entropy"] = torch.tensor(sequence_mean(objective.entropy, micro_mask))
            stats["loss"] = objective.policy_loss + cfg.vf_coef * v_loss.detach() - cfg.ent_coef * entropy_bonus
            return objective.loss + cfg.vf_coef * v_loss * share, stats

        # ---- UPDATE: ppo_epochs passes over minibatches, actor and critic together -----------
        with timer("train"):
            self.policy.train()
            self.critic.train()
            update_stats = minibatch_update(
                batch, loss_fn, self.targets, cfg.ppo_epochs, cfg.minibatch_size,
                cfg.micro_batch_size, self.generator,
            )
            self.policy.eval()
            self.critic.eval()

        kl_per_sequence = float(kl_k1.sum(-1).mean())  # nats per sequence, Ziegler's KL
        # every rank updates the coefficient with the whole batch's KL, so they stay equal
        self.kl_ctl.update(all_mean(kl_per_sequence), N * world_size())

        # undefined (NaN) when the returns do not vary, e.g. every completion empty with equal rewards:
        # logged as 0, "no better than a constant", so that no NaN reaches the logs
        explained = explained_variance(old_values, returns, mask)
        metrics = rollout_metrics(rollout, scores, scored.parts, scored.failures)
        metrics.update(update_stats)
        metrics.update(timer.metrics())
        metrics.update(step_compute_metrics(rollout, sum(scored.model_tokens.values()), self.params,
                                            cfg.ppo_epochs, cfg.recompute_old_logp))
        metrics.update({
            "advantages/mean": float(masked_mean(raw_advantages, mask)),  # before whitening
            "advantages/std": float(masked_var(raw_advantages, mask).sqrt()),
            "advantages/abs_mean": float(masked_mean(raw_advantages.abs(), mask)),
            "returns/mean": float(masked_mean(returns, mask)),
            "values/mean": float(masked_mean(old_values, mask)),
            "explained_var": float(explained) if torch.isfinite(explained) else 0.0,
            "kl_coef": beta,  # the beta this step's rewards used
        })
        if self.reference is not None:
            metrics.update({
                "kl": float(masked_mean(kl_k1, mask)),  # k1 per token
                "kl/sequence": kl_per_sequence,  # k1 summed over each sequence, mean over sequences
                "reward/kl_penalty_mean": float(-(beta * kl_penalty).sum(-1).mean()),
            })
        return metrics, rollout, {"total": scores, **scored.parts}


def build_ppo(cfg: Config, policy, tokenizer, reward_fn, generator: torch.Generator
              ) -> tuple[PPO, dict[str, torch.optim.Optimizer]]:
    """PPO's four models: `policy` (actor), a critic from the policy's weights, a frozen reference
    (none when beta = 0) and `reward_fn`; the actor and the critic get their own AdamW."""
    algo = cfg.algo
    reference = reference_model(policy) if algo.beta > 0 else None
    if is_lora(policy):  # a second adapter on the same frozen base, a zero head
        critic = ValueModel(add_critic_adapter(policy))
    else:  # algo.critic == "policy": a copy of the policy's backbone, a zero head
        critic = ValueModel.from_causal_lm(policy)
    shard_models(cfg.trainer, policy, reference, critic)
    actor, actor_optimizer = actor_target(policy, cfg.trainer, lr=algo.actor_lr)
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    critic_optimizer = build_optimizer(critic_params, cfg.trainer, lr=algo.critic_lr)
    targets = [actor, OptimTarget(critic_optimizer, critic_params, cfg.trainer.max_grad_norm, "critic")]
    kl_ctl = KLController(algo.beta, algo.kl_control == "adaptive", algo.target_kl, algo.kl_horizon)
    ppo = PPO(algo, policy, critic.eval(), reference, tokenizer, reward_fn, targets, generator, kl_ctl)
    return ppo, {"actor": actor_optimizer, "critic": critic_optimizer}
