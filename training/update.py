"""The optimisation half of an RL step, shared by PPO and GRPO: epochs x minibatches x micro-batches.

An algorithm hands over the rollout tensors (all with a leading sample dimension N) and a loss
function for one micro-batch; this module owns shuffling, gradient accumulation, clipping, the
NaN guard, the out-of-memory back-off (halve the micro-batch, redo the minibatch) and the optimiser steps.
"""

from __future__ import annotations

import gc
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from conf.schema import TrainerConfig
from models.lora import actor_parameters
from models.padding_free import agreed_count, assign_bins, balanced_micro_batches
from parallel.distributed import sync_hooks
from training.interrupts import TrainingError

log = logging.getLogger(__name__)


@dataclass
class OptimTarget:
    """One optimiser and the parameters it steps (the actor; PPO adds the critic with its own LR)."""

    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    max_grad_norm: float
    name: str = "actor"
    # (params, this rank's loss was finite) -> every rank's was; averages the gradients over ranks
    # (ddp: parallel.distributed.average_gradients); None in a single process
    grad_sync: Callable[[list[torch.nn.Parameter], bool], bool] | None = None
    # (this rank's loss is finite) -> every rank's is, agreed before the backward: under FSDP the
    # backward's reduce-scatters need every rank (parallel.fsdp); None: decided alone
    finite_sync: Callable[[bool], bool] | None = None
    # (this rank's count) -> the mean over ranks: token means divide by the mean of the ranks' minibatch tokens,
    # so that with gradients averaged over ranks a token mean is the global one (verl's global token count)
    mean_sync: Callable[[float], float] | None = None


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainerConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with the trainer's settings; `lr` overrides trainer.lr (PPO's critic)."""
    return torch.optim.AdamW(
        params,
        lr=cfg.lr if lr is None else lr,
        betas=(cfg.adam_betas[0], cfg.adam_betas[1]),  # two numbers (TrainerConfig checks)
        weight_decay=cfg.weight_decay,
    )


def optim_target(
    params: list[torch.nn.Parameter], cfg: TrainerConfig, name: str, lr: float | None = None
) -> tuple[OptimTarget, torch.optim.AdamW]:
    """`params` with their AdamW and the collective hooks of trainer.strategy (parallel.distributed.sync_hooks)."""
    optimizer = build_optimizer(params, cfg, lr=lr)
    return OptimTarget(optimizer, params, cfg.max_grad_norm, name, **sync_hooks(cfg.strategy)), optimizer


def actor_target(
    policy: torch.nn.Module, cfg: TrainerConfig, lr: float | None = None
) -> tuple[OptimTarget, torch.optim.AdamW]:
    """The policy's trainable parameters with their AdamW (lr: None = trainer.lr)."""
    return optim_target(actor_parameters(policy), cfg, "actor", lr)  # under LoRA: the actor's adapter only


def trim_padding(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop columns that are padding in every row: leading prompt pads, trailing completion pads."""
    prompt_keep = batch["prompt_mask"].any(0).nonzero()
    p0 = int(prompt_keep[0]) if len(prompt_keep) else 0
    tc = max(int(batch["completion_mask"].sum(-1).max()), 1)
    out = {}
    for key, value in batch.items():
        if key.startswith("prompt_") and value.dim() == 2:
            out[key] = value[:, p0:]
        elif value.dim() == 2:  # completion-aligned [N, Tc] tensors
            out[key] = value[:, :tc]
        else:
            out[key] = value
    return out


class OutOfMemoryStop(TrainingError):
    """The update ran out of memory and may not back off further; the loop adds the last checkpoint."""


@dataclass
class MicroBatch:
    """The micro-batch size an algorithm's updates run at: its configured one, halved after each
    out-of-memory error in a forward/backward. The algorithm owns one and passes it to every
    minibatch_update; it is part of the algorithm's checkpointed state, so a resumed run goes on at the
    size it had backed off to (as the uninterrupted run would have)."""

    size: int  # sequences (SFT rows, preference pairs) per forward/backward, now
    max_retries: int = 0  # trainer.max_oom_retries: halvings allowed over the run; 0 = the first OOM stops
    retries: int = 0  # halvings so far
    # > 0: micro-batches of at most this many real tokens (a shared prompt once), balanced, and every decoder
    # pass packed (models.padding_free); `size` is then unused. 0: `size` sequences, padded
    tokens: int = 0

    @property
    def knob(self) -> str:
        return "micro_batch_tokens" if self.tokens > 0 else "micro_batch_size"

    def back_off(self, error: str) -> None:
        """Halve the size (or the token budget) after an out-of-memory error; OutOfMemoryStop when no halving
        is left."""
        now = self.tokens or self.size
        if now == 1 or self.retries >= self.max_retries:
            raise OutOfMemoryStop(
                f"the update ran out of memory at {self.knob}={now} after {self.retries} halving(s) "
                f"(trainer.max_oom_retries={self.max_retries}): {error}"
            )
        smaller = now // 2
        self.retries += 1
        log.warning(
            "out of memory at %s=%d: freed what could be freed, retrying the minibatch at %s=%d "
            "(retry %d of trainer.max_oom_retries=%d)",
            self.knob,
            now,
            self.knob,
            smaller,
            self.retries,
            self.max_retries,
        )
        if self.tokens > 0:
            self.tokens = smaller
        else:
            self.size = smaller

    def state_dict(self) -> dict[str, int]:
        return {"size": self.size, "retries": self.retries, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        """Resume the backed-off size; a smaller configured size wins (the user lowered it to resume).
        None: a checkpoint written before the back-off existed, nothing to restore."""
        if state is not None:
            self.size = min(self.size, int(state["size"]))
            self.retries = int(state["retries"])
            if self.tokens > 0 and state.get("tokens", 0) > 0:
                self.tokens = min(self.tokens, int(state["tokens"]))

    def split(self, batch: dict[str, Tensor], idx: Tensor) -> list[Tensor]:
        """The micro-batches of the rows `idx` of `batch`: consecutive runs of `size`, or (tokens > 0) balanced by
        real tokens: prompt + completion rows by `models.padding_free.balanced_micro_batches` (a shared prompt once),
        rows of whole sequences (preference pairs: input_ids [B, 2, T]) by their `completion_mask` tokens."""
        if self.tokens <= 0:
            return [idx[start : start + self.size] for start in range(0, len(idx), self.size)]
        if "prompt_ids" in batch:
            input_ids = torch.cat([batch["prompt_ids"][idx], batch["completion_ids"][idx]], dim=1)
            attention_mask = torch.cat([batch["prompt_mask"][idx], batch["completion_mask"][idx]], dim=1)
            parts = balanced_micro_batches(input_ids, attention_mask, batch["prompt_ids"].shape[1], self.tokens)
        else:
            costs = batch["completion_mask"][idx].flatten(1).sum(1).tolist()
            parts = [torch.tensor(b, dtype=torch.long) for b in assign_bins([int(c) for c in costs], self.tokens)]
        return [idx[part] for part in agreed_count(parts)]


@dataclass(frozen=True)
class MicroShare:
    """How one micro-batch's loss enters its minibatch's (the loss functions weight their terms by it)."""

    sequences: float  # the micro-batch's share of the minibatch's sequences: for per-sequence means
    # the weight of a mean over the micro-batch's real tokens: `sequences` on the padded path (today's mean of
    # micro-batch means, as TRL accumulates); its share of the minibatch's real tokens when micro-batches are
    # balanced by tokens, so that the token mean is the minibatch's whatever the partition
    token_mean: float
    minibatch_tokens: float  # real completion tokens of the minibatch (dapo's denominator)


def release_memory(targets: list[OptimTarget]) -> None:
    """Drop the gradients of a failed minibatch and hand cached CUDA blocks back, before a retry."""
    for t in targets:
        t.optimizer.zero_grad(set_to_none=True)
    gc.collect()  # the failed pass's autograd graph may sit in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


LossFn = Callable[[dict[str, Tensor], MicroShare], tuple[Tensor, dict[str, Tensor]]]


def accumulate_gradients(
    batch: dict[str, Tensor],
    mb_idx: Tensor,
    loss_fn: LossFn,
    targets: list[OptimTarget],
    micro_batch: MicroBatch,
    mb_tokens: float,
) -> tuple[bool, list[dict[str, float]]]:
    """Forward and backward of the minibatch `mb_idx` of `batch` in the micro-batches of `micro_batch.split`,
    the gradients accumulated in .grad. Returns (every loss was finite, each micro-batch's stats); stops at the
    first non-finite loss, before its backward. `mb_tokens`: the denominator of token means (the minibatch's real
    completion tokens; under data parallelism their mean over ranks)."""
    micro_stats: list[dict[str, float]] = []
    for idx in micro_batch.split(batch, mb_idx):
        micro = trim_padding({k: v[idx] for k, v in batch.items()})
        sequences = len(idx) / len(mb_idx)
        token_mean = float(micro["completion_mask"].sum()) / max(mb_tokens, 1.0) if micro_batch.tokens else sequences
        loss, stats = loss_fn(micro, MicroShare(sequences, token_mean, mb_tokens))
        loss_finite = bool(torch.isfinite(loss))
        if targets[0].finite_sync is not None:
            loss_finite = targets[0].finite_sync(loss_finite)
        if not loss_finite:
            return False, micro_stats
        loss.backward()
        micro_stats.append({key: float(value) for key, value in stats.items()})
    return True, micro_stats


def accumulate_with_backoff(
    batch: dict[str, Tensor],
    mb_idx: Tensor,
    loss_fn: LossFn,
    targets: list[OptimTarget],
    micro_batch: MicroBatch,
    mb_tokens: float,
) -> tuple[bool, list[dict[str, float]]]:
    """accumulate_gradients, redone from zero gradients at half the micro-batch size after each
    out-of-memory error: gradient accumulation keeps the minibatch, so the update is the one an
    uninterrupted pass at the smaller size makes (to accumulation rounding)."""
    while True:
        for t in targets:
            t.optimizer.zero_grad(set_to_none=True)
        try:
            return accumulate_gradients(batch, mb_idx, loss_fn, targets, micro_batch, mb_tokens)
        except torch.OutOfMemoryError as err:
            error = " ".join(str(err).split())[:200]
            if targets[0].finite_sync is not None:  # fsdp: the other ranks wait in this pass's collectives
                raise OutOfMemoryStop(
                    f"the update ran out of memory under trainer.strategy=fsdp, where one rank "
                    f"cannot retry alone: {error}"
                ) from err
        # out here the error and its traceback, which held the failed pass's tensors, are gone
        release_memory(targets)
        micro_batch.back_off(error)


def minibatch_update(
    batch: dict[str, Tensor],
    loss_fn: LossFn,
    targets: list[OptimTarget],
    num_epochs: int,
    minibatch_size: int,
    micro_batch: MicroBatch | int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
) -> dict[str, float]:
    """Run num_epochs passes of shuffled minibatches; returns the mean of every stat plus counters.

    loss_fn(micro, share) -> (loss, stats): `share` (MicroShare) says how the micro-batch's loss enters the
    minibatch's.
    A non-finite loss or gradient norm skips that optimiser step (counted in `skipped_steps`).
    micro_batch: the algorithm's MicroBatch, halved (and the minibatch redone) on an out-of-memory error;
    a plain int runs at that size and stops at the first such error. `oom/retries` counts this update's
    halvings, `oom/micro_batch_size` is the size it ended at.
    """
    if isinstance(micro_batch, int):
        micro_batch = MicroBatch(micro_batch)
    retries_before = micro_batch.retries
    n = batch["completion_mask"].shape[0]
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    steps = skipped = 0
    for _ in range(num_epochs):
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, minibatch_size):
            mb_idx = order[start : start + minibatch_size]
            mb_tokens = float(batch["completion_mask"][mb_idx].sum())
            if targets[0].mean_sync is not None:  # once per minibatch: a rank retrying after an OOM does not ask again
                mb_tokens = targets[0].mean_sync(mb_tokens)
            finite, micro_stats = accumulate_with_backoff(batch, mb_idx, loss_fn, targets, micro_batch, mb_tokens)
            for stats in micro_stats:
                for key, value in stats.items():
                    sums[key] += value
                    counts[key] += 1
            for t in targets:  # every rank reaches this, finite or not, so the collectives pair up
                if t.grad_sync is not None:
                    finite = t.grad_sync(t.params, finite)
            if finite:
                for t in targets:
                    norm = torch.nn.utils.clip_grad_norm_(t.params, t.max_grad_norm)
                    finite = finite and bool(torch.isfinite(norm))
                    sums[f"grad_norm/{t.name}"] += float(norm)
                    counts[f"grad_norm/{t.name}"] += 1
            if finite:
                for t in targets:
                    t.optimizer.step()
                steps += 1
            else:  # leave the weights as they were; the run goes on with the next minibatch
                skipped += 1
            for t in targets:
                t.optimizer.zero_grad(set_to_none=True)
    out = {key: sums[key] / counts[key] for key in sums}
    out.update(optimizer_steps=float(steps), skipped_steps=float(skipped))
    out["oom/retries"] = float(micro_batch.retries - retries_before)
    out["oom/micro_batch_size"] = float(micro_batch.size)
    if micro_batch.tokens > 0:
        out["oom/micro_batch_tokens"] = float(micro_batch.tokens)
    return out
