"""Data-parallel RL on torch.distributed, launched by torchrun: one process per device.

    torchrun --nproc_per_node=8 run.py algo=grpo trainer.strategy=ddp ...

Every rank runs the same loop on its own shard of each step's prompts:
- all ranks draw the same global batch from the seeded PromptSampler and keep their contiguous
  slice of it (`ShardedSampler`); a prompt's G samples are drawn on one rank, so a group never
  crosses ranks and GRPO's group statistics stay local;
- each prompt's samples come from its own generator, seeded from (seed, epoch, position of the
  prompt in that epoch's order), so the samples do not depend on the number of ranks;
- algo.prompts_per_step and algo.minibatch_size are global: each rank takes 1/world of them;
  micro_batch_size is per rank;
- gradients are averaged over ranks before clipping (`average_gradients`), so every rank takes the
  same optimiser step and the weights stay identical without ever being broadcast;
- statistics over the whole batch use every rank's data: PPO's advantage whitening, GRPO's batch-scaled
  advantages (algorithms.batch_stats, on this module's collectives), the adaptive KL controller's KL;
- step metrics are reduced over ranks (`reduce_metrics`); rank 0 alone logs and writes checkpoints.
- after scoring, whole groups move between ranks so that each trains on about the same number of real
  tokens, the same number of groups each (algo.balance_ranks, algorithms.rank_balance);
- token means (dapo's, and every token mean under algo.micro_batch_tokens) divide by the global token count
  over the world size (`sync_hooks`' mean_sync), so they do not depend on which rank holds a sequence.
With equal-length completions the result equals one process on the same global batch (tested), and with
unequal ones for every token mean but the padded path's mean of micro-batch means (bnpo, PPO's value loss
without a token budget), which weighs each rank's micro-batches as it weighs them within one process.

The gradient all-reduce runs after the backward passes of a minibatch rather than overlapped with
them (as torch's DistributedDataParallel would): the loss code calls the decoder and the lm_head
directly, which DDP's forward wrapper would not see. Under LoRA the gradients are the adapters'
(0.16 GiB for the 8B model at rank 16).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from conf.schema import Config, ConfigError
from data.loading import Batch, PromptSampler

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    strategy: str  # single | ddp | fsdp
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def adopt_slurm_tasks() -> None:
    """Under hydra/launcher=slurm (submitit) with several tasks per job, each task is one rank: export the
    variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from the slurm job,
    so that trainer.strategy=ddp|fsdp joins them as it joins torchrun's (and strategy=single says to choose)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or launched_by_torchrun():
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment  # here: only a slurm job needs submitit

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(strategy: str, device: str, timeout_min: float = 60.0) -> DistContext:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); single: one process, no group.

    device: trainer.device (auto | cpu | cuda); under torchrun a CUDA rank takes cuda:LOCAL_RANK.
    timeout_min: trainer.dist_timeout_min, how long a collective waits (the other ranks wait in one while
    rank 0 writes a checkpoint) before the group aborts; torch's own default is 10 minutes under NCCL.
    """
    adopt_slurm_tasks()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if strategy == "single":
        if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ConfigError(
                f"launched by torchrun with {os.environ['WORLD_SIZE']} processes but "
                f"trainer.strategy=single; choose one of: ddp, fsdp"
            )
        return DistContext("single", 0, 1, 0, torch.device("cuda" if use_cuda else "cpu"))
    if not launched_by_torchrun():
        raise ConfigError(
            f"trainer.strategy={strategy} runs one process per device: launch with "
            f"`torchrun --nproc_per_node=N run.py ... trainer.strategy={strategy}`, or use "
            f"trainer.strategy=single"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_min))
    return DistContext(
        strategy,
        dist.get_rank(),
        dist.get_world_size(),
        local_rank,
        torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
    )


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def local_algo_config(cfg: Config, world: int) -> Config:
    """cfg with algo.minibatch_size divided over `world` ranks (prompts_per_step stays global: the
    sampler shards it); raises ConfigError when the global sizes do not split evenly."""
    algo = cfg.algo
    for key in ("prompts_per_step", "minibatch_size"):
        if getattr(algo, key) % world:
            raise ConfigError(
                f"algo.{key}={getattr(algo, key)} does not split over {world} ranks; choose a multiple of {world}"
            )
    return dataclasses.replace(cfg, algo=dataclasses.replace(algo, minibatch_size=algo.minibatch_size // world))


class ShardedSampler:
    """This rank's contiguous slice of each global batch, with each prompt's sampling seed.

    Every rank draws the same global batch from its own PromptSampler (same rows, same seed), so no
    communication is needed; the state is the global sampler's, so a resume works for any world size.
    """

    def __init__(self, sampler: PromptSampler, rank: int, world: int):
        if sampler.batch_size % world:
            raise ConfigError(
                f"algo.prompts_per_step={sampler.batch_size} does not split over {world} ranks; "
                f"choose a multiple of {world}"
            )
        self.sampler, self.rank, self.world = sampler, rank, world

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size // self.world

    def draw(self, seeded: bool = True) -> Batch:
        """This rank's rows of the next global batch, always with their seeds (ranks sample apart)."""
        full = self.sampler.draw(seeded=True)
        assert full.seeds is not None  # drawn seeded
        start = self.rank * self.batch_size
        end = start + self.batch_size
        return Batch(full.rows[start:end], full.seeds[start:end], refill=lambda: self.draw(seeded))

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


# ---- collectives: each is the identity in a single process ---------------------------------------


def comm_device() -> torch.device:
    """Where host values go for a collective: nccl reduces CUDA tensors only."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_mean(value: float) -> float:
    """The mean over ranks of a per-rank float."""
    return float(all_reduce_(torch.tensor([value], dtype=torch.float64, device=comm_device()))[0]) / world_size()


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (pickled: for small metadata and CPU tensors)."""
    world = world_size()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _agree(flag: bool, op: dist.ReduceOp.RedOpType) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    return bool(all_reduce_(value, op)[0] > 0.5)


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every rank."""
    return _agree(flag, dist.ReduceOp.MIN)


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on some rank."""
    return _agree(flag, dist.ReduceOp.MAX)


def all_max(value: int) -> int:
    """The largest of the ranks' integers."""
    return int(all_reduce_(torch.tensor([float(value)], device=comm_device()), dist.ReduceOp.MAX)[0])


def average_gradients(params: list[torch.nn.Parameter], finite: bool) -> bool:
    """Average the gradients of `params` over ranks in one flat all-reduce; returns whether every
    rank's loss was finite (a rank that skipped its backward contributes zeros, and all skip the step).

    Called once per minibatch by every rank, before clipping, so the clip sees the global gradient.
    """
    world = world_size()
    if world == 1:
        return finite
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flag = torch.tensor([0.0 if finite else 1.0], device=params[0].device)  # counts the ranks that failed
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [flag])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = (flat[offset : offset + n] / world).view_as(g).to(g.dtype)
        offset += n
    return bool(flat[-1] == 0)


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """One step's metrics over all ranks: max of maxima (and of times: the slowest rank sets the pace),
    min of minima, sums of counts (tokens, FLOPs, reward failures and timeouts, OOM retries), means of the
    rest (equal-sized shards).

    The ranks need not report the same keys (a rank whose every micro-batch was non-finite has no loss
    statistics): the key sets are gathered first, and a key is reduced over the ranks that have it, so every
    rank sends tensors of one size in one order and gets the same result.
    """
    world = world_size()
    if world == 1:
        return metrics
    key_sets: list[list[str] | None] = [None] * world
    dist.all_gather_object(key_sets, sorted(metrics))  # fills every rank's entry
    keys = sorted(set().union(*(k for k in key_sets if k is not None)))
    device = comm_device()
    have = torch.tensor([k in metrics for k in keys], device=device)
    values = torch.tensor([float(metrics.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    is_max = torch.tensor([k.endswith("_max") or k.startswith("time/") for k in keys], device=device)
    is_min = torch.tensor([k.endswith("_min") for k in keys], device=device)
    is_sum = torch.tensor(
        [
            k.startswith(("tokens/", "compute/")) or k.endswith(("_failures", "_timeouts")) or k == "oom/retries"
            for k in keys
        ],
        device=device,
    )
    sums = all_reduce_(values.clone())  # a missing key adds 0
    ranks = all_reduce_(have.double())  # how many ranks have each key
    maxes = all_reduce_(torch.where(have, values, -torch.inf), dist.ReduceOp.MAX)
    mins = all_reduce_(torch.where(have, values, torch.inf), dist.ReduceOp.MIN)
    out = torch.where(is_max, maxes, torch.where(is_min, mins, torch.where(is_sum, sums, sums / ranks)))
    return {k: float(v) for k, v in zip(keys, out)}


def sync_hooks(strategy: str) -> dict[str, Callable]:
    """The collective hooks of an optimiser target (training.update.OptimTarget) under `strategy`:
    ddp averages the gradients over ranks after the backward passes (`grad_sync`); fsdp's backward
    reduce-scatters them itself, so the ranks only agree first that every loss is finite (`finite_sync`);
    under both, token means divide by the mean over ranks of the minibatch's tokens (`mean_sync`), so that
    the averaged gradient holds the global token mean; a single process needs none of them."""
    if strategy == "ddp":
        return {"grad_sync": average_gradients, "mean_sync": all_mean}
    if strategy == "fsdp":
        return {"finite_sync": all_ranks, "mean_sync": all_mean}
    return {}


class NullLogger:
    """What a rank other than 0 logs to: nothing."""

    run_id: str | None = None  # no wandb run of its own (rank 0's id goes into the checkpoints)
    offline_dir: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_samples(self, step: int, records: list[dict], held_out: bool = False) -> None:
        pass

    def log_samples_table(self, step: int, records: list[dict], key: str = "samples") -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
