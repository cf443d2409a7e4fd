"""The one training loop: every looped stage (RL algorithms, SFT, the reward model) runs here, so each
gets exact resume, Ctrl-C / SIGTERM checkpoints, the NaN guard, the LR schedule, logging and eval.

A stage hands the loop an `Algorithm` (the `Built` its registered builder returns, conf.registry):
the loop draws each step's rows from the sampler and calls `algorithm.step`; the algorithm owns
everything about what a step does (sampling, scoring, losses, optimiser steps via training.update).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tqdm.auto import tqdm

from conf.schema import Config, TrainerConfig
from data.loading import Batch
from models.forward import packed_passes, tally_passes
from parallel.distributed import DistContext, is_main_process, reduce_metrics
from parallel.fsdp import gather_full_state
from training.accounting import accumulate_totals, peak_cuda_mb, peak_rss_mb
from training.checkpoint import describe_os_error, load_checkpoint, prune_checkpoints, save_checkpoint
from training.interrupts import GracefulStop, TrainingError, TrainingInterrupted
from training.tracking import RunLogger
from training.update import MicroBatch, OutOfMemoryStop

if TYPE_CHECKING:
    from models.heads import ScalarHeadModel

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    metrics: dict[str, float]  # this rank's step metrics (the loop reduces them over ranks)
    samples: list[dict] = field(default_factory=list)  # records for samples.jsonl (the loop keeps log_samples)


class Algorithm(Protocol):
    """Everything the loop (and the data-parallel strategies) use of a looped stage."""

    # progress-bar label -> metric key of a step's metrics (e.g. {"reward": "reward/total_mean"})
    progress: dict[str, str]

    # one step: usually one or more optimiser steps. Out of memory it backs off from itself (training.update
    # .MicroBatch, part of its state_dict); what it cannot (OutOfMemoryStop, torch.OutOfMemoryError) it
    # raises, and the loop stops the run with one line naming the last checkpoint
    def step(self, batch: Batch) -> StepOutput: ...

    # held-out metrics (keys under eval/; {} = nothing to evaluate) and sample records for eval_samples.jsonl
    def evaluate(self) -> StepOutput: ...

    def checkpoint_models(self) -> dict[str, ScalarHeadModel]: ...  # trained models besides the policy

    # its micro-batches (training.update.MicroBatch): its `tokens` > 0 runs the step's passes packed
    micro_batch: MicroBatch

    def state_dict(self) -> dict: ...  # algorithm state a resume needs (PPO's KL coefficient)

    def load_state_dict(self, state: dict) -> None: ...


class Sampler(Protocol):
    """Where a step's rows come from (data.loading.PromptSampler, parallel.distributed.ShardedSampler)."""

    def draw(self, seeded: bool = False) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Built:
    """What a looped stage's builder returns: the algorithm, the optimisers it steps (checkpointed and
    scheduled by the loop), and the sampler of its rows (prompts, SFT examples, preference rows)."""

    algorithm: Algorithm
    optimizers: dict[str, torch.optim.Optimizer]
    sampler: Any  # data.loading.PromptSampler
    # run by run.py once fit() has returned (not after an interrupt or an error): what a stage writes when
    # training is done besides checkpoints/final (the reward model's <run_dir>/reward_model)
    finish: Callable[[], None] | None = None


@dataclass
class StageContext:
    """What a stage's builder or runner receives (conf.registry). A driver stage (the pipeline) gets
    only cfg, run_dir, overrides and root: it loads no model itself."""

    cfg: Config
    run_dir: Path
    overrides: list[str] = field(default_factory=list)  # the run's command-line overrides
    root: Path = Path(".")  # the project root (run.py's directory)
    policy: torch.nn.Module | None = None
    tokenizer: Any = None
    train_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    reward_fn: Any = None  # rewards.CombinedReward when the stage uses rewards
    logger: Any = None  # training.tracking.RunLogger (a NullLogger off rank 0)
    generator: torch.Generator | None = None  # seeded; drives sampling and minibatch order
    dist: DistContext | None = None


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_steps, then constant, linear decay to 0, or cosine decay to 0 (per step)."""

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


class Trainer:
    """Runs `algorithm.step` max_steps times; evaluates, logs and checkpoints on the way."""

    def __init__(
        self,
        cfg: TrainerConfig,
        built: Built,
        logger: RunLogger,
        run_dir: Path,
        policy,
        tokenizer,
        generator: torch.Generator | None = None,
        seeded_sampling: bool = False,
    ):
        self.cfg, self.algo, self.sampler, self.optimizers = cfg, built.algorithm, built.sampler, built.optimizers
        self.logger, self.run_dir, self.policy, self.tokenizer = logger, Path(run_dir), policy, tokenizer
        self.seeded_sampling = seeded_sampling  # each row's samples from its own seed (data.loading.Batch)
        self.generators = {"sampling": generator} if generator is not None else {}  # rollout + minibatch order
        self.schedulers = [build_scheduler(opt, cfg) for opt in self.optimizers.values()]
        # running sums, resumed
        self.totals: dict[str, float] = {
            "time/total": 0.0,
            "skipped_steps_total": 0.0,
            "checkpoint/failed_saves_total": 0.0,
        }
        self.start_step = 1
        self.consecutive_skips = 0  # steps in a row whose every optimiser update was non-finite
        self.last_checkpoint: Path | None = None

    def save(self, name: str, step: int) -> Path | None:
        # sharded weights are gathered by every rank first; then one writer (rank 0)
        full_state = gather_full_state(self.policy, self.algo.checkpoint_models(), self.optimizers)
        if not is_main_process():  # ddp: every rank holds the same weights (parallel.distributed)
            return None
        state = {
            "step": step,
            "sampler": self.sampler.state_dict(),
            "totals": self.totals,
            "consecutive_skips": self.consecutive_skips,
            "algo": self.algo.state_dict(),
            "wandb_run_id": self.logger.run_id,
        }  # a resumed run continues this wandb run
        try:
            path = save_checkpoint(
                self.run_dir / "checkpoints" / name,
                self.policy,
                self.tokenizer,
                self.optimizers,
                state,
                self.algo.checkpoint_models(),
                self.schedulers,
                self.generators,
                full_state,
            )
        except OSError as err:  # a full disk: the partial write is gone, the older checkpoints untouched
            self.save_failed(name, err)
            return None
        prune_checkpoints(self.run_dir / "checkpoints", self.cfg.keep_last)
        self.last_checkpoint = path
        return path

    def save_failed(self, name: str, err: OSError) -> None:
        """A checkpoint could not be written: stop with one line (trainer.checkpoint_errors=stop), or warn and
        go on training with the last complete checkpoint still the newest (=warn), counted in
        checkpoint/failed_saves_total."""
        what = (
            f"could not write checkpoint {self.run_dir / 'checkpoints' / name} ({describe_os_error(err)}); "
            f"the partial write was removed and {self.kept()}"
        )
        if self.cfg.checkpoint_errors == "warn":
            self.totals["checkpoint/failed_saves_total"] += 1
            log.warning("%s; training goes on (trainer.checkpoint_errors=warn)", what)
            return
        raise TrainingError(
            f"{what}. Free disk space (or set trainer.keep_last lower), then continue with {self.resume_hint()}"
        )

    def kept(self) -> str:
        """What a stopped run leaves to resume from, for its error line."""
        if self.last_checkpoint is None:
            return "no checkpoint was written"
        return f"the last checkpoint is {self.last_checkpoint} (intact)"

    def resume_hint(self) -> str:
        if self.last_checkpoint is None:
            return "a fresh run (no checkpoint to resume)"
        return f"trainer.resume={self.last_checkpoint}"

    def resume(self, checkpoint: Path) -> int:
        """Continue from `checkpoint`: weights, optimisers, schedulers, RNGs, data position, counters,
        algorithm state. Returns its step; `fit` then runs the steps after it."""
        state = load_checkpoint(
            checkpoint, self.policy, self.optimizers, self.algo.checkpoint_models(), self.schedulers, self.generators
        )
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
        return TrainingError(
            f"{self.consecutive_skips} consecutive steps (up to step {step}) had a non-finite loss or gradient and "
            f"were skipped, so the run stopped (trainer.max_consecutive_skips={self.cfg.max_consecutive_skips}); "
            f"{self.kept()}. Lower trainer.lr or check the rewards and data."
        )

    @contextmanager
    def out_of_memory_stops(self, step: int) -> Iterator[None]:
        """Out of memory that the update could not back off from (it halves the micro-batch itself,
        training.update.MicroBatch), or that came outside it (sampling, no-grad passes, eval), stops the
        run with one line naming the last checkpoint."""
        try:
            yield
        except OutOfMemoryStop as err:
            raise TrainingError(
                f"out of memory in step {step}: {err}; {self.kept()}. Shorten the sequences "
                f"(algo.max_new_tokens, SFT's algo.max_length) or turn on "
                f"trainer.gradient_checkpointing, then continue with {self.resume_hint()}"
            ) from err
        except torch.OutOfMemoryError as err:
            error = " ".join(str(err).split())[:200]
            raise TrainingError(
                f"out of memory in step {step} outside the update's micro-batches (sampling, a "
                f"no-grad pass or eval, which do not back off): {error}; {self.kept()}. Lower "
                f"algo.prompts_per_step, algo.group_size or algo.max_new_tokens (eval: "
                f"trainer.eval_batch_size), then continue with {self.resume_hint()}"
            ) from err

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        last: dict[str, float] = {}
        if self.start_step > cfg.max_steps:
            print(
                f"the checkpoint is at step {self.start_step - 1} >= trainer.max_steps={cfg.max_steps}: "
                "nothing to train (raise trainer.max_steps to continue)"
            )
            return last
        if (cfg.eval_before or cfg.eval_every) and self.start_step == 1:
            with self.out_of_memory_stops(0):
                before = self.algo.evaluate()
            if before.metrics:  # {}: no held-out rows
                self.logger.log(before.metrics, step=0)
                self.logger.log_samples(0, before.samples, held_out=True)
        bar = tqdm(
            range(self.start_step, cfg.max_steps + 1),
            desc="train",
            dynamic_ncols=True,
            initial=self.start_step - 1,
            total=cfg.max_steps,
        )
        with GracefulStop() as stop:
            for step in bar:
                start = time.perf_counter()
                packed = packed_passes(self.algo.micro_batch.tokens)  # padding-free passes when budgeted
                with self.out_of_memory_stops(step), tally_passes() as passes, packed:
                    out = self.algo.step(self.sampler.draw(self.seeded_sampling))
                # what the passes over prompt + completion really forwarded: padding, and prompts shared
                metrics = reduce_metrics(out.metrics | passes.metrics())  # over ranks (the identity in one process)
                for scheduler in self.schedulers:
                    scheduler.step()
                metrics["time/step"] = time.perf_counter() - start
                self.totals["time/total"] += metrics["time/step"]
                diverged = self.guard(metrics)  # before the totals are copied: it counts skipped steps
                metrics.update(accumulate_totals(self.totals, metrics))
                metrics["lr"] = float(self.schedulers[0].get_last_lr()[0])  # a float, or a 0-d tensor lr
                metrics["memory/peak_rss_mb"] = peak_rss_mb()
                if (cuda_mb := peak_cuda_mb()) is not None:
                    metrics["memory/peak_cuda_mb"] = cuda_mb
                stopping = stop.signum is not None
                evaluate = step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0 and not stopping)
                held_out: list[dict] = []
                if evaluate:
                    with self.out_of_memory_stops(step):
                        evaluated = self.algo.evaluate()
                    metrics.update(evaluated.metrics)
                    held_out = evaluated.samples
                self.logger.log(metrics, step)
                self.logger.log_samples(step, out.samples[: cfg.log_samples])
                self.logger.log_samples(step, held_out, held_out=True)
                if cfg.log_samples_every and (step % cfg.log_samples_every == 0 or step == cfg.max_steps):
                    self.logger.log_samples_table(step, out.samples[: cfg.log_samples])
                bar.set_postfix(
                    {label: f"{metrics[key]:.3g}" for label, key in self.algo.progress.items() if key in metrics}
                )
                if diverged:  # no checkpoint of this state: the last good one stays the newest
                    raise self.diverged(step)
                if (cfg.save_every and step % cfg.save_every == 0) or (stopping and step < cfg.max_steps):
                    self.save(f"step_{step}", step)
                last = metrics
                if stopping and step < cfg.max_steps:
                    assert stop.signum is not None  # stopping: a signal came (signum is never reset)
                    raise TrainingInterrupted(stop.signum, step, self.last_checkpoint)
        if cfg.save_final:
            self.save("final", cfg.max_steps)
        return last
