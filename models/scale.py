"""What the trainer's scale settings do to the policy (precision, activation checkpointing, LoRA), and its reference.

Precision. `trainer.precision` (or `model.dtype` under `auto`) is the dtype the model *computes* in. Weights
that train keep fp32 master copies: an AdamW step of lr 1e-5 is below half a bf16 step for any weight above
~4e-3 in magnitude, so bf16 weights would round most updates away. So
- full fine-tuning in bf16 (or fp16) loads the weights in fp32 (their gradients and AdamW moments are then
  fp32 too) and runs every forward of the model under `torch.autocast` in the low precision (single, ddp),
  or lets FSDP2 cast them (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, parallel.fsdp);
- LoRA keeps the frozen base in the low precision (it never updates) and the adapters in fp32 (models.lora);
- a stage that trains nothing (eval, rejection sampling) loads the weights in the compute dtype.

The fp32 matmuls that remain under full fine-tuning in bf16 (lm_head and its log-softmax in models.logprobs and
models.fused_loss: `out=` matmuls and the head called after the autocast forward returned, on fp32 hidden states
and fp32 master weights) run in TF32 on CUDA (`tf32_matmuls`): a bf16-precision run does not need IEEE fp32 there,
and without it lm_head was ~15x slower on an H200. A CPU, or trainer.precision=fp32, keeps them exact.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import torch
from torch import nn

from conf.schema import ModelConfig, TrainerConfig
from models.forward import CausalLM
from models.loading import DTYPES
from models.lora import apply_lora, enable_checkpointing, is_lora, reference_view

PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def compute_dtype(model: ModelConfig, trainer: TrainerConfig) -> str:
    """The dtype the model computes in: trainer.precision, or model.dtype under precision=auto."""
    return model.dtype if trainer.precision == "auto" else PRECISION_DTYPES[trainer.precision]


def keeps_master_weights(model: ModelConfig, trainer: TrainerConfig, trains: bool = True) -> bool:
    """Whether the weights are held in fp32 while the model computes in a lower precision: every weight
    trains (no LoRA) and the compute dtype is bf16 or fp16."""
    return trains and not trainer.lora.enabled and compute_dtype(model, trainer) != "float32"


def autocast_dtype(model: ModelConfig, trainer: TrainerConfig, trains: bool = True) -> torch.dtype | None:
    """The low precision fp32 master weights compute in (autocast, or FSDP2's param_dtype); None when the
    weights compute in their own dtype."""
    return DTYPES[compute_dtype(model, trainer)] if keeps_master_weights(model, trainer, trains) else None


def model_config_for(model: ModelConfig, trainer: TrainerConfig, trains: bool = True) -> ModelConfig:
    """`model` as it is loaded: in the compute dtype, or fp32 when it keeps master weights (`trains`: the
    stage trains the policy), checkpointing off (prepare_policy switches it on after loading)."""
    dtype = "float32" if keeps_master_weights(model, trainer, trains) else compute_dtype(model, trainer)
    # checkpointing is switched on after loading (prepare_policy), where it can be made LoRA-aware
    return dataclasses.replace(model, dtype=dtype, gradient_checkpointing=False)


def prepare_policy(policy: CausalLM, model: ModelConfig, trainer: TrainerConfig, trains: bool = True) -> nn.Module:
    """Checkpointing (model's yaml or trainer.gradient_checkpointing), LoRA when trainer.lora.enabled, and
    the low-precision forward of fp32 master weights (autocast; under fsdp FSDP2 casts them instead)."""
    if model.gradient_checkpointing or trainer.gradient_checkpointing:
        enable_checkpointing(policy)
    if trainer.lora.enabled:
        policy = apply_lora(policy, trainer.lora)
    dtype = autocast_dtype(model, trainer, trains)
    if tf32_matmuls(model, trainer, next(policy.parameters()).device, trains):
        # process-wide; the legacy flag rather than `fp32_precision = "tf32"`: torch refuses to read either API's
        # setting once both were written, and experiments/gpu_measure.py reads this one
        torch.backends.cuda.matmul.allow_tf32 = True
    if dtype is not None and trainer.strategy != "fsdp":
        autocast_forward(policy, dtype)
        autocast_forward(policy.get_decoder(), dtype)  # the log-prob and value passes call the decoder directly
    return policy


def tf32_matmuls(model: ModelConfig, trainer: TrainerConfig, device: torch.device, trains: bool = True) -> bool:
    """Whether fp32 matmuls may run in TF32 (CUDA's allow_tf32): on CUDA, when fp32 master weights compute in a
    lower precision. Then only what runs outside autocast is fp32, lm_head's log-prob passes above all (their
    `out=` matmuls bypass autocast), and TF32's 10-bit mantissa is still finer than the bf16 forward's 7."""
    return device.type == "cuda" and autocast_dtype(model, trainer, trains) is not None


_autocast = threading.local()  # per thread: the autocast contexts entered by the hooks, innermost last


def autocast_forward(module: nn.Module, dtype: torch.dtype) -> None:
    """Run `module`'s forward under torch.autocast(dtype) on its parameters' device; its weights stay as
    they are (fp32). Hooks rather than a wrapped `forward`, so that copies of the module (the reference,
    a critic's backbone) compute the same way."""
    module.register_forward_pre_hook(_AutocastEnter(dtype))
    module.register_forward_hook(_autocast_exit, always_call=True)


class _AutocastEnter:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, module: nn.Module, args) -> None:
        device = next(module.parameters()).device.type
        context = torch.autocast(device, dtype=self.dtype)
        context.__enter__()
        if not hasattr(_autocast, "stack"):
            _autocast.stack = []
        _autocast.stack.append(context)


def _autocast_exit(module: nn.Module, args, output) -> None:
    _autocast.stack.pop().__exit__(None, None, None)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy (the reference policy): eval mode, no gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def reference_model(policy: nn.Module) -> nn.Module:
    """The reference policy: under LoRA the shared base with adapters off, else a frozen copy."""
    return reference_view(policy) if is_lora(policy) else frozen_copy(policy)


def forward_autocast_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype `autocast_forward` runs `module`'s forward in; None when it has no such hook. Code that
    calls the module's submodules directly (the static-cache decoder) enters the same autocast."""
    hooks = getattr(module, "_forward_pre_hooks", {})
    return next((hook.dtype for hook in hooks.values() if isinstance(hook, _AutocastEnter)), None)
