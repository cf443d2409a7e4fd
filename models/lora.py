"""LoRA via peft: one frozen copy of the base weights serves the actor, the reference and PPO's critic.

- the actor trains the adapter named `default` (peft's default name, so a saved actor loads with
  `PeftModel.from_pretrained(base, dir)`);
- the reference is the same model with every adapter switched off: no second copy of the weights;
- PPO's critic is a second adapter, `critic`, read through `AdapterView` under a value head.

Which adapter a forward uses is a property of the shared LoRA layers, so it is switched around each
forward with `adapter_scope`. peft's own switches (`set_adapter`, `disable_adapter`) also flip
`requires_grad` of the adapters, which would silently freeze the critic's adapter after a reference
pass; `adapter_scope` sets only which adapter runs. Gradient checkpointing recomputes a layer's forward
during backward, when another adapter may be the active one: `checkpoint_context_fn` makes the
recomputation run with the adapter that was active in the original forward.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeGuard

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

from conf.schema import LoraOptions
from models.forward import CausalLM, is_checkpointing

ACTOR = "default"
CRITIC = "critic"
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def is_lora(model: nn.Module) -> TypeGuard[PeftModel]:
    return isinstance(model, PeftModel)


def apply_lora(model: CausalLM, opts: LoraOptions) -> PeftModel:
    """Wrap `model` with the actor's adapter; only the adapter is trainable afterwards.

    A bf16 base keeps fp32 adapters (peft's autocast_adapter_dtype): the trained weights and their
    optimiser state stay in full precision at a negligible memory cost.
    """
    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.alpha,  # type: ignore[arg-type]  # peft annotates it int; a float scales as well (alpha / r)
        lora_dropout=opts.dropout,
        target_modules=list(opts.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, adapter_name=ACTOR, autocast_adapter_dtype=True)
    if is_checkpointing(model):
        enable_checkpointing(peft_model)
    return peft_model


def adapter_of(name: str) -> str | None:
    """The adapter a parameter name belongs to (`...q_proj.lora_A.critic.weight` -> critic), else None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _LORA_PARTS:
            return parts[i + 1]
    return None


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if adapter_of(n) == adapter]


def actor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the actor's optimiser steps: its adapter under LoRA, else every trainable parameter."""
    if is_lora(model):
        return adapter_parameters(model, ACTOR)
    return [p for p in model.parameters() if p.requires_grad]


def _tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_state(layers: list[BaseTunerLayer]) -> tuple[str | list[str], bool]:
    return (layers[0]._active_adapter, layers[0]._disable_adapters) if layers else (ACTOR, False)


@contextmanager
def _set_adapter_state(layers: list[BaseTunerLayer], state: tuple[str | list[str], bool]):
    before = _adapter_state(layers)
    for layer in layers:  # private fields on purpose: the public switches also change requires_grad
        layer._active_adapter, layer._disable_adapters = state
    try:
        yield
    finally:
        for layer in layers:
            layer._active_adapter, layer._disable_adapters = before


def adapter_scope(model: PeftModel, adapter: str | None):
    """Run the shared LoRA model with `adapter` active (None: the base alone, adapters off)."""
    layers = _tuner_layers(model)
    return _set_adapter_state(layers, (ACTOR if adapter is None else adapter, adapter is None))


def checkpoint_context_fn(model: nn.Module):
    """torch.utils.checkpoint's context_fn: recompute each layer with the adapter its forward used."""
    layers = _tuner_layers(model)

    def context_fn():
        state = _adapter_state(layers)  # read at forward time
        return nullcontext(), _set_adapter_state(layers, state)

    return context_fn


def enable_checkpointing(model: CausalLM) -> None:
    """Non-reentrant activation checkpointing on every decoder layer; adapter-aware under LoRA."""
    base: CausalLM = model.get_base_model() if is_lora(model) else model
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if is_lora(model):
        kwargs["context_fn"] = checkpoint_context_fn(model)
    # transformers renamed gradient_checkpointing_enable (5.17, the GPU machines') to activation_checkpointing_enable
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable(kwargs)


class AdapterView(nn.Module):
    """The shared LoRA model seen with one adapter (or none: the reference) active.

    Quacks like the causal LM where the code reads one: `get_decoder()` runs the decoder under the
    view's adapter, `get_output_embeddings()` is the (never adapted) lm_head, and calling the view
    runs the decoder, which is what `models.heads.ScalarHeadModel` wants of a backbone. The base
    weights and the view's own adapter are registered as its parameters -- shared tensors, not copies
    -- so that parameter counts and optimisers see what the view computes with; the LoRA model itself
    is not a submodule, so `eval()` or `requires_grad_()` on a view never reaches the other views.
    """

    lora_model: PeftModel  # set with object.__setattr__: not a submodule

    def __init__(self, model: PeftModel, adapter: str | None):
        super().__init__()
        object.__setattr__(self, "lora_model", model)
        self.adapter = adapter
        for name, param in model.named_parameters():
            owner = adapter_of(name)
            if owner is None or owner == adapter:
                self.register_parameter(name.replace(".", "__"), param)

    @property
    def config(self):
        return self.lora_model.config

    @property
    def device(self) -> torch.device:
        return self.lora_model.device

    @property
    def is_activation_checkpointing(self) -> bool:
        # read by models.forward: checkpointed layers run without a KV cache, so no shared-prompt pass
        return any(getattr(m, "gradient_checkpointing", False) for m in self.lora_model.modules())

    def forward(self, **kwargs):
        with adapter_scope(self.lora_model, self.adapter):
            return self.lora_model.get_decoder()(**kwargs)

    def get_decoder(self) -> AdapterView:
        return self

    def get_output_embeddings(self) -> nn.Module:
        return self.lora_model.get_output_embeddings()

    def save_pretrained(self, directory: str | Path, **_) -> Path:
        """The view's adapter alone (peft's format); the base weights are not written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.adapter is not None:
            state = get_peft_model_state_dict(self.lora_model, adapter_name=self.adapter)
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in state.items()}, directory / "adapter_model.safetensors"
            )
            self.lora_model.peft_config[self.adapter].save_pretrained(str(directory))
        return directory


def reference_view(model: PeftModel) -> AdapterView:
    """The reference policy: the frozen base with the adapters off."""
    return AdapterView(model, None).eval()


def add_critic_adapter(model: PeftModel) -> AdapterView:
    """A second adapter with the actor's settings, trainable, seen through a view (a critic backbone).

    lora_B starts at zero, so the critic's backbone starts as the base model, as a full critic
    starts as a copy of the policy.
    """
    model.add_adapter(CRITIC, copy.deepcopy(model.peft_config[ACTOR]))
    for param in adapter_parameters(model, CRITIC):
        param.requires_grad_(True)  # peft leaves a newly added, inactive adapter frozen
    return AdapterView(model, CRITIC)
