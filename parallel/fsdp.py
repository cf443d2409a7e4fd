"""FSDP2 (`fully_shard`): the actor, the critic and the reference sharded over the ranks.

    torchrun --nproc_per_node=8 run.py algo=ppo trainer.strategy=fsdp ...

Each decoder layer is one FSDP unit (its weights are all-gathered just before it runs and freed after),
the causal LM (embeddings, final norm, lm_head) is the root unit, and a critic's fp32 head is a unit of
its own (an FSDP unit holds one dtype). Everything else of the data-parallel loop is shared with ddp
(`parallel.distributed`): prompt shards, per-prompt seeds, global statistics, reduced metrics.

FSDP only knows a module's `forward`; the RL code reaches a model through other entry points, so:
- the completion pass (decoder, then lm_head fused with the log-probs or the loss) runs as a registered
  FSDP forward method of the root (`sharded_completion_pass`, used by `models.logprobs.completion_pass`),
  and a critic's `values` likewise, so the root's weights are gathered for them and their gradients reduce-scattered;
- every rank must run the same sequence of collectives, and three things in the loop are decided per
  rank: when generation stops (each rank's completions end at their own step), whether a batch has
  repeated prompts to prefill once (`models.forward`), and whether a loss is finite (`training.update`).
  Generation therefore runs on gathered weights with no collectives at all (`sampling_weights`, which
  algorithms.rollout enters around its sampling loop, as RL systems gather weights for their inference
  engine), and the other two decisions are agreed on by an all-reduce before they are acted on
  (`models.forward.set_prefill_agreement`, `training.update.OptimTarget.finite_sync`);
- checkpoints gather full (unsharded) state dicts on every rank and rank 0 writes them in the usual
  format, so the weights load anywhere (model.source=local); optimizer states are saved keyed by
  parameter name, so a resume of an fsdp checkpoint needs fsdp.
Gradients are reduce-scattered in fp32 and averaged over ranks, as `average_gradients` does for ddp.
Full fine-tuning in bf16 keeps fp32 weights (models.scale): FSDP2 gathers them in bf16 for compute
(`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`), so gradients, AdamW state and the
checkpointed weights stay fp32; a critic's head computes in fp32.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from models.forward import set_prefill_agreement
from models.logprobs import SHARDED_METHOD, direct_completion_pass
from models.padding_free import set_micro_batch_agreement
from parallel.distributed import all_max, any_rank

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0's CPU


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def _layer_classes(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard_model(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None) -> nn.Module:
    """fully_shard `model` in place over all ranks: its decoder layers, then the root.

    param_dtype: the dtype the (fp32 master) weights are gathered in for compute, e.g. bf16; None: their own.
    """
    if is_sharded(model):
        return model
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layer_classes = _layer_classes(model)
    if not layer_classes:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by")
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    head = getattr(model, "head", None)  # a critic's fp32 head next to a bf16 backbone: computes in fp32
    if isinstance(head, nn.Linear):
        fully_shard(head, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    fully_shard(model, mesh=mesh, mp_policy=policy)
    set_prefill_agreement(any_rank)  # models.forward: one prefill per prompt on every rank, or on none
    set_micro_batch_agreement(all_max)  # models.padding_free: as many token-budget micro-batches on every rank
    return model


def shard_policy(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None) -> nn.Module:
    """A causal LM (actor or reference): its log-prob pass becomes an FSDP forward method."""
    shard_model(model, device, param_dtype)
    setattr(model, SHARDED_METHOD, types.MethodType(direct_completion_pass, model))
    register_fsdp_forward_method(model, SHARDED_METHOD)
    return model


def shard_critic(critic: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None) -> nn.Module:
    """A models.heads.ValueModel: `values` becomes an FSDP forward method."""
    shard_model(critic, device, param_dtype)
    register_fsdp_forward_method(critic, "values")
    return critic


def sampling_weights(model: nn.Module) -> contextlib.AbstractContextManager:
    """The context to sample from `model` in: its gathered weights when it is sharded (`gathered_weights`),
    else nothing to do."""
    return gathered_weights(model) if is_sharded(model) else contextlib.nullcontext()


@contextmanager
def gathered_weights(model: nn.Module) -> Iterator[None]:
    """Every FSDP unit of `model` unsharded for the block, and kept so across forwards: the block may
    run any number of forwards without a collective (sampling, whose length differs per rank)."""
    assert isinstance(model, FSDPModule)  # a sharded model's root (sampling_weights)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    model.set_reshard_after_forward(False, recurse=True)
    try:
        yield
    finally:
        # back to fully_shard's default: layers reshard after forward, the root keeps its weights for the
        # backward that follows it (resharding it too would gather them a second time)
        model.set_reshard_after_forward(True, recurse=True)
        model.set_reshard_after_forward(False, recurse=False)
        for unit in units:
            unit.reshard()


def optimizer_models(optimizers: dict[str, torch.optim.Optimizer], models: list[nn.Module]) -> dict[str, nn.Module]:
    """Which of `models` each optimizer steps (found by its first parameter)."""
    owners = {}
    for name, optimizer in optimizers.items():
        first = optimizer.param_groups[0]["params"][0]
        owner = next((m for m in models if any(p is first for p in m.parameters())), None)
        if owner is None:
            raise ValueError(f"optimizer {name!r} steps none of the sharded models")
        owners[name] = owner
    return owners


def _full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered state dict with each tied parameter once (lm_head <-> embeddings), as HF saves it."""
    # full_state_dict: plain tensors (torch types the values as any kind of state, sharded ones included)
    state = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=FULL))
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            state.pop(name, None)
        seen.add(id(param))
    return state


@dataclass
class FullState:
    """A sharded run's checkpoint content, gathered onto rank 0's CPU (empty dicts on other ranks)."""

    policy: dict[str, torch.Tensor]
    extra_models: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, dict]  # each keyed by parameter name


def gather_full_state(
    policy: nn.Module, extra_models: Mapping[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]
) -> FullState | None:
    """The full weights and optimizer states of a sharded run; None when `policy` is not sharded.
    Collective: every rank calls it, rank 0 writes what it returns."""
    if not is_sharded(policy):
        return None
    owners = optimizer_models(optimizers, [policy, *extra_models.values()])
    return FullState(
        _full_weights(policy),
        {name: _full_weights(model) for name, model in extra_models.items()},
        {name: get_optimizer_state_dict(owners[name], opt, options=FULL) for name, opt in optimizers.items()},
    )


def load_full_state(
    policy: nn.Module,
    policy_state: dict[str, torch.Tensor],
    extra_models: Mapping[str, nn.Module],
    extra_states: dict[str, dict[str, torch.Tensor]],
    optimizers: dict[str, torch.optim.Optimizer],
    optimizer_states: dict[str, dict],
) -> None:
    """Load full weights and name-keyed optimizer states (read by every rank) into sharded models:
    each rank keeps its shard."""
    options = StateDictOptions(full_state_dict=True, strict=False)  # tied lm_head: saved once
    # torch annotates the state as the invariant Dict[str, ValueType]: a dict of plain tensors is one
    set_model_state_dict(policy, policy_state, options=options)  # type: ignore[arg-type]
    for name, model in extra_models.items():
        set_model_state_dict(model, extra_states[name], options=options)  # type: ignore[arg-type]
    owners = optimizer_models(optimizers, [policy, *extra_models.values()])
    for name, optimizer in optimizers.items():
        set_optimizer_state_dict(
            owners[name], optimizer, optimizer_states[name], options=StateDictOptions(full_state_dict=True)
        )


def shard_models(
    strategy: str,
    policy: nn.Module,
    reference: nn.Module | None,
    critic: nn.Module | None = None,
    param_dtype: torch.dtype | None = None,
) -> None:
    """Under trainer.strategy=fsdp, fully_shard the models in place (before their optimisers are built:
    sharding replaces the parameters); otherwise nothing. param_dtype: the compute dtype of fp32 master
    weights (models.scale.autocast_dtype), None when the weights compute in their own dtype."""
    if strategy != "fsdp":
        return
    device = next(policy.parameters()).device
    for model in (policy, reference):
        if model is not None:
            shard_policy(model, device, param_dtype)
    if critic is not None:
        shard_critic(critic, device, param_dtype)
