"""What every policy-gradient algorithm here shares: its config base, its state, and the pieces of a step.

An algorithm file (grpo.py, ppo.py, rloo.py, reinforce_pp.py) declares its config as a subclass of
`PolicyGradientConfig` (only the options it adds, and the defaults it changes), subclasses
`PolicyGradient`, writes its `step()` top to bottom from the pieces below (sample and score, old and
reference log-probs, the clipped policy update, the metrics), and registers a builder
(conf.registry.register_stage). They differ in the advantage estimator, the critic and where the KL
enters; sampling, scoring, log-probs, the KL estimators, the loss aggregation and the loop are these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.advantages import masked_mean, overlong_penalty
from algorithms.common import batched_logprobs, rollout_metrics, rollout_tensors, sample_and_score
from algorithms.compute import add_discarded_generation, model_params, step_compute_metrics
from algorithms.dynamic_sampling import DrawCost, refill_groups
from algorithms.evaluate import evaluate_policy
from algorithms.losses import KL_ESTIMATORS, LOSS_TYPES, RATIO_LEVELS, SURROGATES, kl_estimate
from algorithms.metrics import step_tensor_metrics
from algorithms.objective import policy_micro_loss
from algorithms.rank_balance import balance_ranks
from algorithms.rollout import Rollout, RolloutConfig, check_rollout
from algorithms.rollout_correction import ROLLOUT_CORRECTIONS, rollout_correction
from conf.checks import ConfigError, check_choice, check_range
from conf.options import option
from data.loading import Batch, PromptSampler
from models.heads import ScalarHeadModel, ValueModel
from models.scale import autocast_dtype, compute_dtype, reference_model
from parallel.fsdp import shard_models
from rewards.combine import RewardOutput
from training.loop import Built, StageContext, StepOutput
from training.timers import PhaseTimer
from training.tracking import sample_records
from training.update import MicroBatch, MicroShare, OptimTarget, actor_target, minibatch_update

KL_PLACEMENTS = ("loss", "reward")
EVAL_SEED_OFFSET = 10_000  # held-out samples are drawn with seed + this at every eval: comparable across steps


@dataclass
class PolicyGradientConfig:
    """The options of every policy-gradient algorithm (algo.*); a subclass adds its own and may change defaults."""

    name: str = option("policy_gradient", "the stage's name (algo=<name>)")
    prompts_per_step: int = option(2, "P: prompts per RL step")
    group_size: int = option(4, "G: samples per prompt; N = P * G sequences per step")
    num_iterations: int = option(
        1, "mu: optimisation passes over each rollout batch (1 = on-policy, the ratio starts at 1)"
    )
    minibatch_size: int = option(8, "sequences per optimiser step (N / minibatch_size optimiser steps per pass)")
    micro_batch_size: int = option(8, "sequences per forward/backward; gradients accumulate up to minibatch_size")
    micro_batch_tokens: int = option(
        0,
        "> 0: padding-free passes: micro-batches of at most this many real tokens (a shared prompt once), "
        "balanced, each run as packed rows (micro_batch_size is then unused; the gradient is the same for any "
        "budget); 0: micro_batch_size padded sequences",
    )
    balance_ranks: bool = option(
        True,
        "under data parallelism, move whole groups between ranks after scoring so that each trains on about the "
        "same number of real tokens, the same number of groups each (algorithms.rank_balance; verl's "
        "balance_batch); no effect in one process",
    )
    max_new_tokens: int = option(40, "completion budget, in tokens; longer completions are truncated (no EOS)")
    temperature: float = option(1.0, "sampling temperature; the log-probs are of the same tempered policy")
    top_p: float = option(1.0, "nucleus sampling (1.0 = off); recorded log-probs stay the untruncated policy's")
    loss_type: str = option(
        "grpo", "how per-token losses are aggregated: grpo | bnpo | dr_grpo | dapo (TRL's definitions)"
    )
    surrogate: str = option(
        "clip", "the per-token policy loss: clip (PPO's clipped ratio) | cispo | sapo (algorithms.losses.SURROGATES)"
    )
    ratio_level: str = option(
        "token", "where the importance ratio is taken: token | sequence (GSPO: exp of each sequence's mean log-ratio)"
    )
    clip_low: float = option(0.2, "surrogate=clip: the ratio is clipped to [1 - clip_low, 1 + clip_high]")
    clip_high: float = option(0.2, "surrogate=clip: upper clip (1 + clip_high); > clip_low is DAPO's clip-higher")
    cispo_cap: float = option(5.0, "surrogate=cispo: upper bound of the detached ratio (TRL's epsilon_high there)")
    sapo_tau_pos: float = option(1.0, "surrogate=sapo: the soft gate's temperature for tokens with A > 0")
    sapo_tau_neg: float = option(1.05, "surrogate=sapo: the soft gate's temperature for tokens with A <= 0")
    rollout_correction: str = option(
        "none",
        "sampler-vs-trainer mismatch correction of the policy loss: none | tis (weight min(rho, cap)) | mis "
        "(rho, 0 outside [low, high]) | seq_mis (tis, 0 for sequences whose mean rho is outside the band)",
    )
    rollout_correction_cap: float = option(2.0, "tis, seq_mis: the cap of the truncated importance weight")
    rollout_correction_low: float = option(0.5, "mis, seq_mis: the band's lower end of rho = pi_trainer / pi_sampler")
    rollout_correction_high: float = option(2.0, "mis, seq_mis: the band's upper end")
    beta: float = option(0.04, "KL coefficient (in the loss or in the reward: kl_in); 0 = no reference model, no KL")
    kl_estimator: str = option("k3", "k1 | k2 | k3 (Schulman's estimators of KL(pi || ref), per token)")
    ent_coef: float = option(0.0, "entropy bonus coefficient (0 = none)")
    # null -> true in bf16/fp16: the KV-cached sampling pass and the full training pass round apart, so the ratio
    # would not start at 1; in fp32 they agree to ~1e-6 and the extra forward is saved
    recompute_old_logp: bool | None = option(
        None,
        "true: a no-grad forward for the old log-probs instead of the sampling-time ones (which are then kept to "
        "measure the mismatch: rollout_corr/*) | false | null: true in bf16/fp16 or with a rollout_correction",
    )
    fused_loss: bool = option(
        True, "policy loss and its gradient inside the lm_head pass (models.fused_loss) instead of after it"
    )
    default_max_steps: int | None = option(
        None, "trainer.max_steps when it is not given (conf/trainer/default.yaml); null: the trainer's default"
    )
    kl_in: str = option(
        "loss",
        "where beta * KL enters: loss (GRPO's: a term of the policy loss) | reward (PPO's: -beta * KL_t in every "
        "token's reward, so the advantages carry it)",
    )
    # groups whose scores are all equal give a group baseline no signal
    dynamic_sampling: bool = option(
        False,
        "DAPO's dynamic sampling (Yu et al. 2025): drop groups whose scores are all equal and draw more prompts "
        "until prompts_per_step groups remain (needs group_size >= 2)",
    )
    dynamic_sampling_metric: str = option(
        "total",
        "the score whose spread makes a group informative: total (the weighted reward) | the name of one reward "
        "component, e.g. accuracy or format_strict (verl's filter_groups.metric): a small shaping term then does "
        "not keep a group that the task reward cannot tell apart",
    )
    dynamic_sampling_max_draws: int = option(
        4, "extra draws of prompts_per_step prompts a step may make; still short then, dropped groups fill the batch"
    )
    overlong_buffer: int = option(
        0,
        "DAPO's soft overlong penalty: completions longer than max_new_tokens - overlong_buffer tokens get a "
        "linear penalty, reaching -overlong_penalty at max_new_tokens, added to the sequence reward (0 = off)",
    )
    overlong_penalty: float = option(1.0, "the overlong penalty's factor (its value at max_new_tokens)")
    eval_samples: int = option(1, "k samples per held-out prompt: pass@1 (mean over the k), pass@k, maj@k")
    pass_threshold: float = option(1.0, "a held-out sample passes when its accuracy reward part is >= this")
    rollout: RolloutConfig = option(factory=RolloutConfig, help="how completions are decoded (algo.rollout.*)")

    def __post_init__(self) -> None:
        check_choice("algo.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.loss_type == "gspo":
            raise ConfigError(
                "algo.loss_type=gspo is a ratio level, not an aggregation: write algo.loss_type=grpo "
                "algo.ratio_level=sequence"
            )
        check_choice("algo.loss_type", self.loss_type, LOSS_TYPES)
        check_choice("algo.surrogate", self.surrogate, tuple(SURROGATES))
        check_choice("algo.ratio_level", self.ratio_level, RATIO_LEVELS)
        check_choice("algo.rollout_correction", self.rollout_correction, ROLLOUT_CORRECTIONS)
        if self.rollout_correction != "none" and self.recompute_old_logp is False:
            raise ConfigError(
                f"algo.rollout_correction={self.rollout_correction} compares the sampler's log-probs with the "
                "trainer's: leave algo.recompute_old_logp at null (or true)"
            )
        for key in ("cispo_cap", "sapo_tau_pos", "sapo_tau_neg", "rollout_correction_cap"):
            check_range(f"algo.{key}", getattr(self, key), 1e-6)
        check_range("algo.rollout_correction_low", self.rollout_correction_low, 0.0, 1.0)
        check_range("algo.rollout_correction_high", self.rollout_correction_high, 1.0)
        for key in (
            "prompts_per_step",
            "group_size",
            "num_iterations",
            "minibatch_size",
            "micro_batch_size",
            "max_new_tokens",
        ):
            check_range(f"algo.{key}", getattr(self, key), 1)
        check_range("algo.temperature", self.temperature, 1e-3)
        check_range("algo.top_p", self.top_p, 1e-3, 1.0)
        for key in ("beta", "clip_low", "clip_high", "ent_coef", "overlong_penalty"):
            check_range(f"algo.{key}", getattr(self, key), 0.0)
        check_choice("algo.kl_in", self.kl_in, KL_PLACEMENTS)
        check_range("algo.dynamic_sampling_max_draws", self.dynamic_sampling_max_draws, 0)
        check_range("algo.micro_batch_tokens", self.micro_batch_tokens, 0)
        check_range("algo.overlong_buffer", self.overlong_buffer, 0, self.max_new_tokens)
        check_range("algo.eval_samples", self.eval_samples, 1)
        check_rollout(self.rollout)
        if self.dynamic_sampling and self.group_size < 2:
            raise ConfigError(
                f"algo.dynamic_sampling=true with algo.group_size={self.group_size}: it drops groups "
                "whose samples all score the same, which needs algo.group_size >= 2"
            )


class PolicyGradient:
    """The state every policy-gradient algorithm holds, and the steps they share."""

    progress = {"reward": "reward/total_mean", "len": "completion/length_mean"}

    def __init__(
        self,
        cfg: PolicyGradientConfig,
        ctx: StageContext,
        reference: torch.nn.Module | None,
        targets: list[OptimTarget],
        critic: ValueModel | None = None,
    ):
        assert ctx.policy is not None  # a looped stage's context always has the policy (run.py)
        if cfg.recompute_old_logp is None:
            low_precision = compute_dtype(ctx.cfg.model, ctx.cfg.trainer) != "float32"
            cfg = dataclasses.replace(cfg, recompute_old_logp=low_precision or cfg.rollout_correction != "none")
        self.cfg = cfg
        self.policy, self.tokenizer, self.reward_fn = ctx.policy, ctx.tokenizer, ctx.reward_fn
        self.reference = reference  # None when beta == 0: no reference forward at all
        self.critic = critic
        self.targets = targets  # the optimisers one update steps together (PPO: actor and critic)
        # the micro-batch size every forward runs at: algo.micro_batch_size, halved by an update that ran out
        # of memory (training.update.MicroBatch); checkpointed, so a resumed run keeps the smaller size
        self.micro_batch = MicroBatch(
            cfg.micro_batch_size, ctx.cfg.trainer.max_oom_retries, tokens=cfg.micro_batch_tokens
        )
        self.generator = ctx.generator  # sampling and minibatch order (checkpointed by the loop)
        self.eval_rows = ctx.eval_rows
        self.eval_batch_size = ctx.cfg.trainer.eval_batch_size
        self.eval_seed = ctx.cfg.seed + EVAL_SEED_OFFSET
        self.params = model_params(self.policy, reference, critic, self.reward_fn)
        self.draw_cost = DrawCost()  # this step's draws beyond its batch (dynamic sampling), set by `sample`
        self.correction_metrics: dict[str, float] = {}  # the sampler-vs-trainer mismatch, set by `sample`

    # ---- what the loop uses (training.loop.Algorithm) -------------------------------------------
    def step(self, batch: Batch) -> StepOutput:
        raise NotImplementedError  # each algorithm's own (GRPO, RLOO, REINFORCE++, PPO)

    def checkpoint_models(self) -> dict[str, ScalarHeadModel]:
        return {} if self.critic is None else {"critic": self.critic}  # the policy is saved by the loop

    def state_dict(self) -> dict:
        return {"micro_batch": self.micro_batch.state_dict()}  # besides the weights, optimisers, RNGs the loop saves

    def load_state_dict(self, state: dict) -> None:
        self.micro_batch.load_state_dict(state.get("micro_batch"))  # absent from older checkpoints

    def evaluate(self) -> StepOutput:
        """algo.eval_samples samples per held-out prompt with a fixed seed, so evals at different steps are
        comparable: the reward parts, format rates, pass@1 (and pass@k, maj@k with k > 1), and every sample
        (with its row's id and reward parts) for eval_samples.jsonl."""
        sampling = {
            "max_new_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "rollout": self.cfg.rollout,
        }
        metrics, batches = evaluate_policy(
            self.policy,
            self.tokenizer,
            self.eval_rows,
            self.reward_fn,
            sampling,
            self.eval_batch_size,
            self.eval_seed,
            self.cfg.eval_samples,
            self.cfg.pass_threshold,
        )
        samples = []
        for rollout, scored in batches:
            parts = {"total": scored.total, **scored.parts}
            records = sample_records(
                rollout.prompts,
                rollout.completions,
                parts,
                len(rollout.completions),
                lengths=rollout.completion_lengths,
            )
            samples += [{"id": row.get("id"), **record} for row, record in zip(rollout.rows, records)]
        return StepOutput({f"eval/{key}": value for key, value in metrics.items()}, samples)

    # ---- the shared pieces of a step ---------------------------------------------------------------
    def sample_and_score(self, batch: Batch, timer: PhaseTimer) -> tuple[Rollout, RewardOutput]:
        """G samples per prompt of `batch` and their rewards, the overlong penalty (when on) included."""
        cfg = self.cfg
        rollout, scored = sample_and_score(
            self.policy, self.tokenizer, self.reward_fn, batch.rows, batch.seeds, cfg, self.generator, timer
        )
        if cfg.overlong_buffer:
            penalty = overlong_penalty(
                rollout.completion_lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty
            ).to(scored.total.device)  # [N]
            scored = dataclasses.replace(
                scored, total=scored.total + penalty, parts={**scored.parts, "overlong": penalty}
            )
        return rollout, scored

    def sample(self, batch: Batch, timer: PhaseTimer) -> tuple[Rollout, RewardOutput, dict[str, Tensor]]:
        """G samples per prompt (group-contiguous), their rewards, and the rollout as [N, ...] tensors
        with old_logp (sampling-time, or recomputed) and ref_logp (when there is a reference). With dynamic
        sampling, the informative groups of as many draws as it took (algorithms.dynamic_sampling)."""
        cfg = self.cfg
        rollout, scored = self.sample_and_score(batch, timer)
        self.draw_cost = DrawCost()
        if cfg.dynamic_sampling:
            refilled = refill_groups(
                batch,
                (rollout, scored),
                lambda more: self.sample_and_score(more, timer),
                cfg.group_size,
                cfg.dynamic_sampling_max_draws,
                self.tokenizer.pad_token_id,
                cfg.dynamic_sampling_metric,
            )
            rollout, scored, self.draw_cost = refilled.rollout, refilled.scored, refilled.cost
        self.balance_metrics: dict[str, float] = {}
        if cfg.balance_ranks:  # before any pass, so that every pass of the step sees balanced work
            rollout, scored, self.balance_metrics = balance_ranks(
                rollout, scored, cfg.group_size, self.tokenizer.pad_token_id
            )
        tensors = rollout_tensors(rollout)
        self.correction_metrics = {}
        if cfg.recompute_old_logp:  # otherwise the sampling-time log-probs are the old policy's
            with timer("old_logp"):
                tensors["old_logp"] = batched_logprobs(self.policy, rollout, self.micro_batch, cfg.temperature)
            # the sampler's log-probs beside the trainer's: their mismatch, measured every step, corrected if asked
            weights, self.correction_metrics = rollout_correction(
                tensors["old_logp"],
                rollout.logp,
                rollout.completion_mask,
                cfg.rollout_correction,
                cfg.rollout_correction_cap,
                cfg.rollout_correction_low,
                cfg.rollout_correction_high,
            )
            if cfg.rollout_correction != "none":
                tensors["is_weight"] = weights  # [N, Tc], sliced into micro-batches with the rest
        if self.reference is not None:
            with timer("reference"):
                tensors["ref_logp"] = batched_logprobs(self.reference, rollout, self.micro_batch, cfg.temperature)
        return rollout, scored, tensors

    def kl_penalty(self, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(k1 [N, Tc], the per-token KL penalty of the rewards [N, Tc]) of the sampling policy against the
        reference, 0 on padding: the penalty is the configured estimator with algo.kl_in=reward, 0 with
        kl_in=loss (the KL is then a term of the loss, `loss_beta`) and without a reference."""
        mask, old = tensors["completion_mask"], tensors["old_logp"]
        if "ref_logp" not in tensors:
            return torch.zeros_like(old), torch.zeros_like(old)
        ref = tensors["ref_logp"]
        if self.cfg.kl_in == "loss":
            return (old - ref) * mask, torch.zeros_like(old)
        return (old - ref) * mask, kl_estimate(old, ref, self.cfg.kl_estimator) * mask

    def loss_beta(self, beta: float) -> float:
        """The KL coefficient of the loss: beta with algo.kl_in=loss and a reference, else 0 (the KL is in
        the rewards, or there is no reference)."""
        return beta if self.cfg.kl_in == "loss" and self.reference is not None else 0.0

    def kl_in_reward_metrics(self, kl_penalty: Tensor, beta: float) -> dict[str, float]:
        """The KL's part of the reward with algo.kl_in=reward, -beta * sum_t KL_t per sequence; {} without a
        reference or with kl_in=loss (the loss logs `kl/loss_term`). kl_penalty: [N, Tc] from `kl_penalty`.
        `kl` itself is logged the same way by every algorithm (algorithms.metrics)."""
        if self.reference is None or self.cfg.kl_in == "loss":
            return {}
        return {"reward/kl_penalty_mean": float(-(beta * kl_penalty).sum(-1).mean())}

    def update_policy(self, tensors: dict[str, Tensor], timer: PhaseTimer, beta_in_loss: float) -> dict[str, float]:
        """num_iterations passes of clipped policy loss (+ beta_in_loss * KL when > 0) - ent_coef * entropy
        over minibatches; `tensors` carries advantages ([N] or [N, Tc]). Returns the update's statistics."""
        cfg = self.cfg

        def loss_fn(micro: dict[str, Tensor], share: MicroShare):
            return policy_micro_loss(self.policy, micro, cfg, share, beta_in_loss)

        with timer("train"):
            self.policy.train()
            stats = minibatch_update(
                tensors, loss_fn, self.targets, cfg.num_iterations, cfg.minibatch_size, self.micro_batch, self.generator
            )
            self.policy.eval()
        return stats

    def step_output(
        self,
        rollout: Rollout,
        scored: RewardOutput,
        rewards: Tensor,
        metrics: dict[str, float],
        timer: PhaseTimer,
        tensors: dict[str, Tensor],
    ) -> StepOutput:
        """The metrics every RL step logs (samples, rewards, advantages, KL, cost, phase times) around the
        algorithm's own, and the sample records. `tensors`: what the update trained on (advantages [N] or
        [N, Tc], completion_mask, old_logp, ref_logp); `rewards` [N]: the task rewards. A sample's advantage is
        recorded as its mean over the completion's tokens."""
        out = rollout_metrics(rollout, rewards, scored.parts, scored.failures, scored.timeouts)
        out.update(metrics)
        out.update(step_tensor_metrics(tensors, rewards, self.cfg.group_size))
        out.update(self.correction_metrics)  # rollout_corr/*: only when the old log-probs were recomputed
        out.update(timer.metrics())
        out.update(
            step_compute_metrics(
                rollout,
                sum(scored.model_tokens.values()),
                self.params,
                self.cfg.num_iterations,
                bool(self.cfg.recompute_old_logp),  # a bool since __init__ (null: set from the precision)
            )
        )
        out.update(self.balance_metrics)  # ranks/*: only under data parallelism
        out.update(self.draw_cost.metrics)  # dynamic sampling: what was drawn, and the discarded samples' cost
        add_discarded_generation(
            out, self.draw_cost.prompt_tokens, self.draw_cost.generated_tokens, self.params["actor"]
        )
        parts = {"total": rewards, **scored.parts}
        advantages = tensors["advantages"]
        if advantages.dim() == 2:  # per token: the sequence's mean
            advantages = masked_mean(advantages, rollout.completion_mask, dim=-1)  # [N]
        records = sample_records(
            rollout.prompts,
            rollout.completions,
            parts,
            len(rollout.completions),
            advantages=advantages,
            lengths=rollout.completion_lengths,
        )
        return StepOutput(out, records)


def build_actor_and_reference(
    ctx: StageContext, lr: float | None = None, critic: torch.nn.Module | None = None
) -> tuple[torch.nn.Module | None, OptimTarget, torch.optim.Optimizer]:
    """The frozen reference (none when algo.beta = 0), every model sharded under fsdp, then the actor's
    AdamW (built after sharding, which replaces the parameters)."""
    assert ctx.policy is not None  # a looped stage's context always has the policy (run.py)
    cfg = ctx.cfg
    reference = reference_model(ctx.policy) if cfg.algo.beta > 0 else None
    # fp32 master weights of bf16 full fine-tuning are gathered in bf16 for compute (models.scale)
    shard_models(cfg.trainer.strategy, ctx.policy, reference, critic, autocast_dtype(cfg.model, cfg.trainer))
    target, optimizer = actor_target(ctx.policy, cfg.trainer, lr=lr)
    return reference, target, optimizer


def build_critic_free(algorithm: type[PolicyGradient], ctx: StageContext) -> Built:
    """A critic-free algorithm (GRPO, RLOO, REINFORCE++) on ctx.policy: the actor, its reference, its sampler."""
    reference, target, optimizer = build_actor_and_reference(ctx)
    algo = algorithm(ctx.cfg.algo, ctx, reference, [target])
    return Built(algo, {"actor": optimizer}, PromptSampler(ctx.train_rows, ctx.cfg.algo.prompts_per_step, ctx.cfg.seed))
