"""The optimisation half of an RL step, shared by PPO and GRPO: epochs x minibatches x micro-batches.

An algorithm hands over the rollout tensors (all with a leading sample dimension N) and a loss
function for one micro-batch; this module owns shuffling, gradient accumulation, clipping, the
NaN guard and the optimiser steps.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from conf.schema import TrainerConfig
from models.lora import actor_parameters
from parallel.distributed import sync_hooks


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


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainerConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with the trainer's settings; `lr` overrides trainer.lr (PPO's critic)."""
    return torch.optim.AdamW(params, lr=cfg.lr if lr is None else lr, betas=tuple(cfg.adam_betas),
                             weight_decay=cfg.weight_decay)


def optim_target(params: list[torch.nn.Parameter], cfg: TrainerConfig, name: str, lr: float | None = None
                 ) -> tuple[OptimTarget, torch.optim.AdamW]:
    """`params` with their AdamW and the collective hooks of trainer.strategy (parallel.distributed.sync_hooks)."""
    optimizer = build_optimizer(params, cfg, lr=lr)
    return OptimTarget(optimizer, params, cfg.max_grad_norm, name, **sync_hooks(cfg.strategy)), optimizer


def actor_target(policy: torch.nn.Module, cfg: TrainerConfig, lr: float | None = None
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


def minibatch_update(
    batch: dict[str, Tensor],
    loss_fn: Callable[[dict[str, Tensor], float, float], tuple[Tensor, dict[str, Tensor]]],
    targets: list[OptimTarget],
    num_epochs: int,
    minibatch_size: int,
    micro_batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
) -> dict[str, float]:
    """Run num_epochs passes of shuffled minibatches; returns the mean of every stat plus counters.

    loss_fn(micro, micro_share, minibatch_tokens) -> (loss, stats): micro_share is the micro-batch's
    fraction of its minibatch's samples, minibatch_tokens the real completion tokens of the minibatch.
    A non-finite loss or gradient norm skips that optimiser step (counted in `skipped_steps`).
    """
    n = batch["completion_mask"].shape[0]
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    steps = skipped = 0
    for _ in range(num_epochs):
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, minibatch_size):
            mb_idx = order[start : start + minibatch_size]
            mb_tokens = float(batch["completion_mask"][mb_idx].sum())
            for t in targets:
                t.optimizer.zero_grad(set_to_none=True)
            finite = True
            for m_start in range(0, len(mb_idx), micro_batch_size):
                idx = mb_idx[m_start : m_start + micro_batch_size]
                micro = trim_padding({k: v[idx] for k, v in batch.items()})
                loss, stats = loss_fn(micro, len(idx) / len(mb_idx), mb_tokens)
                loss_finite = bool(torch.isfinite(loss))
                if targets[0].finite_sync is not None:
                    loss_finite = targets[0].finite_sync(loss_finite)
                if not loss_finite:
                    finite = False
                    break
                loss.backward()
                for key, value in stats.items():
                    sums[key] += float(value)
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
    return out
