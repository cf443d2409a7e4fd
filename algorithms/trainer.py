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
from algorithms.checkpoint import save_checkpoint
from algorithms.common import rollout_metrics
from algorithms.distributed import is_main_process
from algorithms.rollout import Rollout, generate_rollout
from algorithms.tracking import RunLogger, sample_records
from conf.schema import TrainerConfig
from data.loading import PromptSampler


class Algorithm(Protocol):
    prompts_per_step: int

    def step(self, rows: list[dict]) -> tuple[dict[str, float], Rollout, dict[str, torch.Tensor]]: ...

    def checkpoint_models(self) -> dict[str, torch.nn.Module]: ...  # trained models besides the policy

    def state_dict(self) -> dict: ...  # algorithm state a resume needs (PPO's KL coefficient)


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


class Trainer:
    """Runs `algo.step` max_steps times; evaluates, logs and checkpoints on the way."""

    def __init__(self, cfg: TrainerConfig, algo: Algorithm, sampler: PromptSampler, eval_rows: list[dict],
                 logger: RunLogger, run_dir: Path, policy, tokenizer, reward_fn,
                 optimizers: dict[str, torch.optim.Optimizer], eval_sampling: dict, seed: int):
        self.cfg, self.algo, self.sampler, self.eval_rows = cfg, algo, sampler, eval_rows
        self.logger, self.run_dir, self.policy, self.tokenizer = logger, Path(run_dir), policy, tokenizer
        self.reward_fn, self.optimizers, self.eval_sampling, self.seed = reward_fn, optimizers, eval_sampling, seed
        self.schedulers = [build_scheduler(opt, cfg) for opt in optimizers.values()]
        self.totals: dict[str, float] = {"time/total": 0.0}  # running sums, logged every step, resumed

    def evaluate(self) -> dict[str, float]:
        """One sample per held-out prompt with a fixed seed, so evals at different steps are comparable."""
        if not self.eval_rows:
            return {}
        generator = torch.Generator().manual_seed(self.seed + 10_000)
        batches: list[tuple[int, dict[str, float]]] = []  # (prompts, that batch's metrics)
        for start in range(0, len(self.eval_rows), self.cfg.eval_batch_size):
            rows = self.eval_rows[start : start + self.cfg.eval_batch_size]
            rollout = generate_rollout(self.policy, self.tokenizer, rows, 1, generator=generator, **self.eval_sampling)
            scored = self.reward_fn(rollout.prompts, rollout.completions, rollout.rows)
            batches.append((len(rows), rollout_metrics(rollout, scored.total, scored.parts, scored.failures)))
        return {f"eval/{key}": combine_batches(key, batches, len(self.eval_rows))
                for key in batches[0][1] if not key.endswith("_std")}

    def save(self, name: str, step: int) -> Path | None:
        if not is_main_process():  # one writer: every rank holds the same weights (algorithms.distributed)
            return None
        state = {"step": step, "sampler": self.sampler.state_dict(), "totals": self.totals,
                 "algo": self.algo.state_dict()}
        return save_checkpoint(self.run_dir / "checkpoints" / name, self.policy, self.tokenizer, self.optimizers, state,
                               self.algo.checkpoint_models())

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        last: dict[str, float] = {}
        if cfg.eval_every:
            self.logger.log(self.evaluate(), step=0)
        bar = tqdm(range(1, cfg.max_steps + 1), desc="train", dynamic_ncols=True)
        for step in bar:
            start = time.perf_counter()
            rows = self.sampler.next_batch()
            metrics, rollout, rewards = self.algo.step(rows)
            for scheduler in self.schedulers:
                scheduler.step()
            metrics["time/step"] = time.perf_counter() - start
            self.totals["time/total"] += metrics["time/step"]
            metrics.update(accumulate_totals(self.totals, metrics))
            metrics["lr"] = self.schedulers[0].get_last_lr()[0]
            metrics["memory/peak_rss_mb"] = peak_rss_mb()
            if (cuda_mb := peak_cuda_mb()) is not None:
                metrics["memory/peak_cuda_mb"] = cuda_mb
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
                metrics.update(self.evaluate())
            if step == cfg.max_steps:
                metrics.update(self.evaluate())
            self.logger.log(metrics, step)
            self.logger.log_samples(step, sample_records(rollout.prompts, rollout.completions, rewards, cfg.log_samples))
            bar.set_postfix(reward=f"{metrics['reward/total_mean']:.3f}", len=f"{metrics['completion/length_mean']:.0f}")
            if cfg.save_every and step % cfg.save_every == 0:
                self.save(f"step_{step}", step)
            last = metrics
        if cfg.save_final:
            self.save("final", cfg.max_steps)
        return last
