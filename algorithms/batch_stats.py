"""Statistics over the whole batch of a step, on every rank's share of it (the identity of the plain
functions of algorithms.advantages in a single process): advantage whitening and batch-scaled
group advantages see the global batch, so the result does not depend on the number of ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from algorithms.advantages import group_advantages, group_scale, masked_mean, whiten
from parallel.distributed import all_reduce_, rank, world_size


def global_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """`advantages.whiten` with the mean and (unbiased) variance of the real entries on every rank."""
    if world_size() == 1:
        return whiten(x, mask, shift_mean, eps)
    m = mask.to(x.dtype)
    stats = all_reduce_(torch.stack([(x * m).sum(), m.sum()]).double())
    count = stats[1].clamp(min=1.0)
    mean = (stats[0] / count).to(x.dtype)
    sq = all_reduce_((((x - mean) ** 2) * m).sum().double().reshape(1))[0]
    var = (sq / count * (count / (count - 1) if count > 1 else 1.0)).to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def global_masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    if world_size() == 1:
        return masked_mean(x, mask)
    m = mask.to(x.dtype)
    stats = all_reduce_(torch.stack([(x * m).sum(), m.sum()]).double())
    return (stats[0] / stats[1].clamp(min=1.0)).to(x.dtype)


def sharded_group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """`group_advantages` of this rank's rewards [N_local]; with scale=batch the std is the global batch's.

    Groups never cross ranks, so only the batch scale needs the other ranks' rewards: they are
    gathered, the advantages computed on the whole batch and this rank's slice returned.
    """
    if world_size() == 1 or scale != "batch":
        return group_advantages(rewards, group_size, scale, eps)
    return _on_global_batch(lambda full: group_advantages(full, group_size, scale, eps), rewards)


def sharded_group_scale(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """`group_scale` of this rank's rewards [N_local]; with scale=batch the std is the global batch's."""
    if world_size() == 1 or scale != "batch":
        return group_scale(rewards, group_size, scale, eps)
    return _on_global_batch(lambda full: group_scale(full, group_size, scale, eps), rewards)


def _on_global_batch(fn, rewards: Tensor) -> Tensor:
    """fn of every rank's rewards gathered into one [N] tensor, this rank's slice of the [N] result."""
    world = world_size()
    gathered = [torch.empty_like(rewards) for _ in range(world)]
    dist.all_gather(gathered, rewards.contiguous())
    return fn(torch.cat(gathered)).view(world, -1)[rank()]
