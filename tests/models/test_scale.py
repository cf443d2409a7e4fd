"""Precision of full fine-tuning: fp32 master weights under a bf16 forward (models.scale)."""

from __future__ import annotations

import pytest
import torch

from conf.schema import LoraOptions, ModelConfig, TrainerConfig
from models.loading import load_causal_lm
from models.logprobs import completion_logprobs
from models.lora import actor_parameters
from models.scale import autocast_dtype, frozen_copy, model_config_for, prepare_policy, tf32_matmuls
from tests.conftest import TINY
from training.update import build_optimizer

LR = 1e-5


def one_adamw_step(policy: torch.nn.Module, trainer: TrainerConfig) -> dict[str, torch.Tensor]:
    """One AdamW step at trainer.lr on a fixed policy-gradient-like loss; each weight's change, in fp32."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 1000, (4, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # one left-padded prompt
    advantages = torch.randn(4, 1, generator=g)
    before = {n: p.detach().float().clone() for n, p in policy.named_parameters()}
    logp, _ = completion_logprobs(policy, input_ids, attention_mask, completion_len=6)
    (-(logp * advantages).sum()).backward()
    optimizer = build_optimizer(actor_parameters(policy), trainer)
    optimizer.step()
    return {n: p.detach().float() - before[n] for n, p in policy.named_parameters()}


def loaded_policy(trainer: TrainerConfig, tokenizer) -> torch.nn.Module:
    model_cfg = ModelConfig(name="tiny_llama", **TINY)
    return prepare_policy(load_causal_lm(model_config_for(model_cfg, trainer), tokenizer), model_cfg, trainer)


def changed(deltas: dict[str, torch.Tensor]) -> float:
    flat = torch.cat([d.flatten() for d in deltas.values()])
    return float((flat != 0).float().mean())


def test_bf16_full_fine_tuning_keeps_fp32_master_weights_and_trains_like_fp32(tokenizer):
    fp32, bf16 = TrainerConfig(precision="fp32", lr=LR), TrainerConfig(precision="bf16", lr=LR)
    policy = loaded_policy(bf16, tokenizer)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}  # master weights (and so AdamW state)
    ids = torch.tensor([[1, 2, 3]])
    assert policy(input_ids=ids).logits.dtype == torch.bfloat16  # ... while the forward runs in bf16
    assert frozen_copy(policy)(input_ids=ids).logits.dtype == torch.bfloat16  # the reference computes alike
    assert not torch.is_autocast_enabled("cpu")  # and nothing leaks out of the forward

    step32, step16 = one_adamw_step(loaded_policy(fp32, tokenizer), fp32), one_adamw_step(policy, bf16)
    assert changed(step32) > 0.8
    assert changed(step16) > 0.8 and abs(changed(step16) - changed(step32)) < 0.05
    a, b = (torch.cat([d.flatten() for d in s.values()]) for s in (step32, step16))
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.9  # the same update, to bf16 rounding

    # what bf16 weights without master copies do: most of the update rounds away
    bare = load_causal_lm(ModelConfig(name="tiny_llama", **{**TINY, "dtype": "bfloat16"}), tokenizer)
    assert changed(one_adamw_step(bare, bf16)) < 0.5


@pytest.mark.parametrize(
    "lora, trains, expected", [(False, True, "float32"), (True, True, "bfloat16"), (False, False, "bfloat16")]
)
def test_which_weights_keep_fp32_masters(lora, trains, expected):
    model_cfg = ModelConfig(name="tiny_llama", **TINY)
    trainer = TrainerConfig(precision="bf16", lora=LoraOptions(enabled=lora))
    assert model_config_for(model_cfg, trainer, trains=trains).dtype == expected  # LoRA: a frozen bf16 base
    assert autocast_dtype(model_cfg, trainer, trains) == (torch.bfloat16 if expected == "float32" else None)
    assert model_config_for(model_cfg, TrainerConfig(precision="fp32")).dtype == "float32"


@pytest.mark.parametrize(
    "precision, lora, trains, device, expected",
    [
        ("bf16", False, True, "cuda", True),  # fp32 master weights: lm_head's fp32 matmuls in TF32
        ("bf16", False, True, "cpu", False),  # a CPU stays exact
        ("fp32", False, True, "cuda", False),  # fp32 asked for: IEEE fp32
        ("bf16", True, True, "cuda", False),  # LoRA: a bf16 base, no fp32 lm_head
        ("bf16", False, False, "cuda", False),  # a stage that trains nothing loads bf16 weights
    ],
)
def test_tf32_only_for_fp32_master_weights_on_cuda(precision, lora, trains, device, expected):
    model_cfg = ModelConfig(name="tiny_llama", **TINY)
    trainer = TrainerConfig(precision=precision, lora=LoraOptions(enabled=lora))
    assert tf32_matmuls(model_cfg, trainer, torch.device(device), trains) is expected


def test_bf16_full_fine_tuning_on_a_cpu_leaves_fp32_matmuls_exact(tokenizer):
    assert not torch.backends.cuda.matmul.allow_tf32
    loaded_policy(TrainerConfig(precision="bf16"), tokenizer)
    assert not torch.backends.cuda.matmul.allow_tf32


def test_prepare_policy_switches_tf32_on_where_it_is_decided(tokenizer, monkeypatch):
    import models.scale

    monkeypatch.setattr(models.scale, "tf32_matmuls", lambda *args: True)  # as on CUDA under bf16
    before = torch.backends.cuda.matmul.allow_tf32  # a custom __getattr__: monkeypatch cannot restore it
    try:
        loaded_policy(TrainerConfig(precision="bf16"), tokenizer)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
