"""The training loop shared by every RL algorithm: steps, LR schedule, eval, logging, checkpoints."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from algorithms.accounting import accumulate_totals, peak_cuda_mb
from algorithms.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from algorithms.common import rollout_metrics
from algorithms.distributed import is_main_process
from algorithms.fsdp import gather_full_state
from algorithms.interrupts import GracefulStop, TrainingError, TrainingInterrupted
from algorithms.rollout import Rollout, generate_rollout
from algorithms.tracking import RunLogger, sample_records
from conf.schema import TrainerConfig
from data.loading import PromptSampler
from rewards.combine import RewardOutput


class Algorithm(Protocol):
    prompts_per_step: int

    def step(self, rows: list[dict]) -> tuple[dict[str, float], Rollout, dict[str, torch.Tensor]]: ...

    def checkpoint_models(self) -> dict[str, torch.nn.Module]: ...  # trained models besides the policy

    def state_dict(self) -> dict: ...  # algorithm state a resume needs (PPO's KL coefficient)

    def load_state_dict(self, state: dict) -> None: ...


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_steps, then constant, linear decay to 0, or cosine decay to 0 (per RL step)."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def combine_batches(key: str, batches: list[tuple[int, dict[str, float]]], total: int) -> float:
    """One metric over all eval batches: extremes of extremes, sums of counts, weighted means of means."""
    values = [metrics[key] for _, metrics in batches]
    if key.endswith("_max"):
        return max(values)
    if key.endswith("_min"):
        return min(values)
    if key.endswith("_failures") or key == "tokens/generated":
        return sum(values)
    return sum(n * metrics[key] for n, metrics in batches) / total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def evaluate_policy(policy, tokenizer, rows: list[dict], reward_fn, sampling: dict, batch_size: int, seed: int
                    ) -> tuple[dict[str, float], list[tuple[Rollout, RewardOutput]]]:
    """One sample per row, in batches, seeded by `seed`: (rollout metrics over all rows, every batch's
    (rollout, scores)). `sampling`: max_new_tokens, temperature, top_p. No rows: ({}, [])."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[tuple[int, dict[str, float]]] = []  # (prompts, that batch's metrics)
    scored_batches = []
    for start in tqdm(range(0, len(rows), batch_size), desc="eval", leave=False, dynamic_ncols=True):
        batch_rows = rows[start : start + batch_size]
        rollout = generate_rollout(policy, tokenizer, batch_rows, 1, generator=generator, **sampling)
        scored = reward_fn(rollout.prompts, rollout.completions, rollout.rows)
        batches.append((len(batch_rows), rollout_metrics(rollout, scored.total, scored.parts, scored.failures)))
        scored_batches.append((rollout, scored))
    if not batches:
        return {}, []
    metrics = {key: combine_batches(key, batches, len(rows)) for key in batches[0][1] if not key.endswith("_std")}
    return metrics, scored_batches


class Trainer:
    """Runs `algo.step` max_steps times; evaluates, logs and checkpoints on the way."""

    def __init__(self, cfg: TrainerConfig, algo: Algorithm, sampler: PromptSampler, eval_rows: list[dict],
                 logger: RunLogger, run_dir: Path, policy, tokenizer, reward_fn,
                 optimizers: dict[str, torch.optim.Optimizer], eval_sampling: dict, seed: int,
                 generator: torch.Generator | None = None):
        self.cfg, self.algo, self.sampler, self.eval_rows = cfg, algo, sampler, eval_rows
        self.logger, self.run_dir, self.policy, self.tokenizer = logger, Path(run_dir), policy, tokenizer
        self.reward_fn, self.optimizers, self.eval_sampling, self.seed = reward_fn, optimizers, eval_sampling, seed
        self.generators = {"sampling": generator} if generator is not None else {}  # rollout + minibatch order
        self.schedulers = [build_scheduler(opt, cfg) for opt in optimizers.values()]
        self.totals: dict[str, float] = {"time/total": 0.0, "skipped_steps_total": 0.0}  # running sums, resumed
        self.start_step = 1
        self.consecutive_skips = 0  # RL steps in a row whose every optimiser update was non-finite
        self.last_checkpoint: Path | None = None

    def evaluate(self) -> dict[str, float]:
        """One sample per held-out prompt with a fixed seed, so evals at different steps are comparable."""
        metrics, _ = evaluate_policy(self.policy, self.tokenizer, self.eval_rows, self.reward_fn, self.eval_sampling,
                                     self.cfg.eval_batch_size, self.seed + 10_000)
        return {f"eval/{key}": value for key, value in metrics.items()}

    def save(self, name: str, step: int) -> Path | None:
        # sharded weights are gathered by every rank first; then one writer (rank 0)
        full_state = gather_full_state(self.policy, self.algo.checkpoint_models(), self.optimizers)
        if not is_main_process():  # ddp: every rank holds the same weights (algorithms.distributed)
            return None
        state = {"step": step, "sampler": self.sampler.state_dict(), "totals": self.totals,
                 "consecutive_skips": self.consecutive_skips, "algo": self.algo.state_dict()}
        path = save_checkpoint(self.run_dir / "checkpoints" / name, self.policy, self.tokenizer, self.optimizers,
                               state, self.algo.checkpoint_models(), self.schedulers, self.generators,
                               full_state)
        prune_checkpoints(self.run_dir / "checkpoints", self.cfg.keep_last)
        self.last_checkpoint = path
        return path

    def resume(self, checkpoint: Path) -> int:
        """Continue from `checkpoint`: weights, optimisers, schedulers, RNGs, data position, counters,
        algorithm state. Returns its step; `fit` then runs the steps after it."""
        state = load_checkpoint(checkpoint, self.policy, self.optimizers, self.algo.checkpoint_models(),
                                self.schedulers, self.generators)
        self.sampler.load_state_dict(state["sampler"])
        self.algo.load_state_dict(state["algo"])
        self.totals.update(state["totals"])
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.start_step = int(state["step"]) + 1
        self.last_checkpoint = Path(checkpoint)
        self.logger.truncate_after(int(state["step"]))  # steps logged after the checkpoint are redone
        return int(state["step"])

    def guard(self, metrics: dict[str, float]) -> bool:
        """Count steps whose every update was skipped for a non-finite loss or gradient (the weights
        then stay those of the last good step); True once cfg.max_consecutive_skips come in a row."""
        skipped = metrics.get("skipped_steps", 0.0)
        self.totals["skipped_steps_total"] += skipped
        all_skipped = skipped > 0 and metrics.get("optimizer_steps", 0.0) == 0
        self.consecutive_skips = self.consecutive_skips + 1 if all_skipped else 0
        metrics["skipped_steps_consecutive"] = float(self.consecutive_skips)
        return self.consecutive_skips >= self.cfg.max_consecutive_skips

    def diverged(self, step: int) -> TrainingError:
        kept = f"the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
        return TrainingError(
            f"{self.consecutive_skips} consecutive steps (up to step {step}) had a non-finite loss or gradient and "
            f"were skipped, so the run stopped (trainer.max_consecutive_skips={self.cfg.max_consecutive_skips}); "
            f"{kept}. Lower trainer.lr or check the rewards and data.")

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        last: dict[str, float] = {}
        if self.start_step > cfg.max_steps:
            print(f"the checkpoint is at step {self.start_step - 1} >= trainer.max_steps={cfg.max_steps}: "
                  "nothing to train (raise trainer.max_steps to continue)")
            return last
        if cfg.eval_every and self.start_step == 1:
            self.logger.log(self.evaluate(), step=0)
        bar = tqdm(range(self.start_step, cfg.max_steps + 1), desc="train", dynamic_ncols=True,
                   initial=self.start_step - 1, total=cfg.max_steps)
        with GracefulStop() as stop:
            for step in bar:
                start = time.perf_counter()
                rows = self.sampler.next_batch()
                metrics, rollout, rewards = self.algo.step(rows)
                for scheduler in self.schedulers:
                    scheduler.step()
                metrics["time/step"] = time.perf_counter() - start
                self.totals["time/total"] += metrics["time/step"]
                diverged = self.guard(metrics)  # before the totals are copied: it counts skipped steps
                metrics.update(accumulate_totals(self.totals, metrics))
                metrics["lr"] = self.schedulers[0].get_last_lr()[0]
                metrics["memory/peak_rss_mb"] = peak_rss_mb()
                if (cuda_mb := peak_cuda_mb()) is not None:
                    metrics["memory/peak_cuda_mb"] = cuda_mb
                stopping = stop.signum is not None
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps and not stopping:
                    metrics.update(self.evaluate())
                if step == cfg.max_steps:
                    metrics.update(self.evaluate())
                self.logger.log(metrics, step)
                self.logger.log_samples(step, sample_records(rollout.prompts, rollout.completions, rewards,
                                                             cfg.log_samples))
                bar.set_postfix(reward=f"{metrics['reward/total_mean']:.3f}",
                                len=f"{metrics['completion/length_mean']:.0f}")
                if diverged:  # no checkpoint of this state: the last good one stays the newest
                    raise self.diverged(step)
                if (cfg.save_every and step % cfg.save_every == 0) or (stopping and step < cfg.max_steps):
                    self.save(f"step_{step}", step)
                last = metrics
                if stopping and step < cfg.max_steps:
                    raise TrainingInterrupted(stop.signum, step, self.last_checkpoint)
        if cfg.save_final:
            self.save("final", cfg.max_steps)
        return last
