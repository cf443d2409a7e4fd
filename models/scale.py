"""What the trainer's scale settings do to the policy (precision, activation checkpointing, LoRA), and its reference."""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from conf.schema import ModelConfig, TrainerConfig
from models.lora import apply_lora, enable_checkpointing, is_lora, reference_view

PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def model_config_for(model: ModelConfig, trainer: TrainerConfig) -> ModelConfig:
    """`model` with trainer.precision (unless auto) as its dtype and checkpointing on when either asks."""
    dtype = model.dtype if trainer.precision == "auto" else PRECISION_DTYPES[trainer.precision]
    # checkpointing is switched on after loading (prepare_policy), where it can be made LoRA-aware
    return dataclasses.replace(model, dtype=dtype, gradient_checkpointing=False)


def prepare_policy(policy: nn.Module, model: ModelConfig, trainer: TrainerConfig) -> nn.Module:
    """Checkpointing (model's yaml or trainer.gradient_checkpointing), then LoRA when trainer.lora.enabled."""
    if model.gradient_checkpointing or trainer.gradient_checkpointing:
        enable_checkpointing(policy)
    if trainer.lora.enabled:
        policy = apply_lora(policy, trainer.lora)
    return policy


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy (the reference policy): eval mode, no gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def reference_model(policy: nn.Module) -> nn.Module:
    """The reference policy: under LoRA the shared base with adapters off, else a frozen copy."""
    return reference_view(policy) if is_lora(policy) else frozen_copy(policy)
