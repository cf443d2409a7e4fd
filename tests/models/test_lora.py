"""LoRA on one frozen base: the actor's adapter, the reference with adapters off, PPO's critic adapter."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from algorithms.common import batched_forward, batched_logprobs, micro_logprobs, micro_values, rollout_tensors
from algorithms.grpo import GRPOConfig, build_grpo
from algorithms.ppo import PPOConfig, build_ppo
from algorithms.rollout import generate_rollout
from conf.schema import Config, DataConfig, LoggerConfig, LoraOptions, ModelConfig, RewardConfig, TrainerConfig
from data.loading import Batch
from models.forward import is_checkpointing, packed_passes
from models.heads import ValueModel
from models.loading import load_causal_lm
from models.lora import ACTOR, CRITIC, AdapterView, adapter_of, add_critic_adapter, apply_lora, enable_checkpointing
from models.scale import model_config_for, prepare_policy
from tests.conftest import TINY
from training.checkpoint import save_checkpoint
from training.loop import StageContext
from training.update import MicroBatch


def rows_for(tokenizer, n: int = 2) -> list[dict]:
    return [
        {
            "prompt": tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Say something {i}."}], tokenize=False, add_generation_prompt=True
            )
        }
        for i in range(n)
    ]


def config(algo, **trainer) -> Config:
    trainer = {"lr": 1e-2, "lora": LoraOptions(enabled=True, rank=4, alpha=8), **trainer}
    return Config(
        model=ModelConfig(name="tiny_llama", **TINY),
        data=DataConfig(),
        reward=RewardConfig(),
        algo=algo,
        trainer=TrainerConfig(**trainer),
        logger=LoggerConfig(mode="disabled"),
    )


def context(cfg: Config, policy, tokenizer, reward) -> StageContext:
    return StageContext(
        cfg,
        None,
        policy=policy,
        tokenizer=tokenizer,
        train_rows=rows_for(tokenizer),
        reward_fn=reward,
        generator=torch.Generator().manual_seed(0),
    )


def test_adapter_of_names():
    assert adapter_of("base_model.model.model.layers.0.self_attn.q_proj.lora_A.critic.weight") == "critic"
    assert adapter_of("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight") == "default"
    assert adapter_of("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") is None


def test_ppo_lora_trains_only_adapters_and_head(tiny_model, tokenizer, letter_e_reward, tmp_path):
    base = copy.deepcopy(tiny_model)
    cfg = config(PPOConfig(group_size=2, minibatch_size=4, micro_batch_size=2, max_new_tokens=6, beta=0.1, vf_coef=1.0))
    policy = prepare_policy(tiny_model, cfg.model, cfg.trainer)
    assert isinstance(policy, PeftModel)
    built = build_ppo(context(cfg, policy, tokenizer, letter_e_reward))
    algo, optimizers = built.algorithm, built.optimizers
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    head_before = algo.critic.head.weight.detach().clone()
    # the optimisers hold exactly the two adapters and the head: no base weight, no overlap
    actor_ids = {id(p) for g in optimizers["actor"].param_groups for p in g["params"]}
    critic_ids = {id(p) for g in optimizers["critic"].param_groups for p in g["params"]}
    named = dict(policy.named_parameters())
    assert actor_ids == {id(p) for n, p in named.items() if adapter_of(n) == ACTOR}
    assert critic_ids == {id(p) for n, p in named.items() if adapter_of(n) == CRITIC} | {
        id(p) for p in algo.critic.head.parameters()
    }

    for _ in range(2):
        algo.step(Batch(rows_for(tokenizer)))
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert {adapter_of(n) for n in changed} == {ACTOR, CRITIC}, "a base weight moved or an adapter did not"
    assert not torch.equal(algo.critic.head.weight, head_before)

    # the reference is the base model: adapters off gives the base's log-probs, adapters on does not
    rollout = generate_rollout(policy, tokenizer, rows_for(tokenizer), 2, 6, generator=torch.Generator().manual_seed(1))
    ref = batched_logprobs(algo.reference, rollout, 4, 1.0)
    torch.testing.assert_close(ref, batched_logprobs(base, rollout, 4, 1.0), rtol=0, atol=1e-5)
    assert not torch.allclose(batched_logprobs(policy, rollout, 4, 1.0), ref, atol=1e-4)

    # packed passes through the adapters, the reference's adapters-off view and the critic's: the same numbers
    packed = MicroBatch(1, tokens=48)
    for model in (policy, algo.reference):
        padded_logp = batched_logprobs(model, rollout, 4, 1.0)
        with packed_passes(packed.tokens):
            torch.testing.assert_close(batched_logprobs(model, rollout, packed, 1.0), padded_logp, atol=1e-5, rtol=1e-5)
    padded_values = batched_forward(lambda micro: micro_values(algo.critic, micro), rollout, 4)
    with packed_passes(packed.tokens):
        values = batched_forward(lambda micro: micro_values(algo.critic, micro), rollout, packed)
    torch.testing.assert_close(values, padded_values, atol=1e-5, rtol=1e-5)

    # the checkpoint holds the adapters and the head, no base weights
    state = {"step": 2}
    ckpt = save_checkpoint(tmp_path / "ckpt", policy, tokenizer, optimizers, state, algo.checkpoint_models())
    weights = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*.safetensors"))
    assert weights == ["adapter_model.safetensors", "critic/adapter_model.safetensors", "critic/head.safetensors"]
    saved = load_file(ckpt / "adapter_model.safetensors")
    assert all("lora_" in key for key in saved)
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for n, p in named.items() if adapter_of(n) == ACTOR)
    # and it loads back onto a fresh base as the same policy
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), ckpt)
    torch.testing.assert_close(batched_logprobs(reloaded, rollout, 4, 1.0), batched_logprobs(policy, rollout, 4, 1.0))


def test_grpo_lora_bf16_checkpointing(tokenizer, letter_e_reward):
    cfg = config(
        GRPOConfig(prompts_per_step=2, group_size=2, minibatch_size=4, micro_batch_size=2, max_new_tokens=6),
        precision="bf16",
        gradient_checkpointing=True,
    )
    model_cfg = model_config_for(cfg.model, cfg.trainer)
    assert model_cfg.dtype == "bfloat16"
    policy = prepare_policy(load_causal_lm(model_cfg, tokenizer), model_cfg, cfg.trainer)
    assert is_checkpointing(policy.get_base_model())
    assert {p.dtype for n, p in policy.named_parameters() if adapter_of(n)} == {torch.float32}
    assert {p.dtype for n, p in policy.named_parameters() if not adapter_of(n)} == {torch.bfloat16}
    algo = build_grpo(context(cfg, policy, tokenizer, letter_e_reward)).algorithm
    before = [p.detach().clone() for p in algo.targets[0].params]
    metrics = algo.step(Batch(rows_for(tokenizer))).metrics
    assert metrics["optimizer_steps"] == 1 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert any(not torch.equal(p, b) for p, b in zip(algo.targets[0].params, before))
    algo.micro_batch = MicroBatch(2, tokens=64)  # packed passes under bf16 and activation checkpointing
    with packed_passes(64):
        metrics = algo.step(Batch(rows_for(tokenizer))).metrics
    assert metrics["optimizer_steps"] == 1 and torch.isfinite(torch.tensor(metrics["loss"]))


def adapter_grads(model, checkpointing: bool, tokenizer) -> dict[str, torch.Tensor]:
    """Gradients of actor log-probs + critic values in one backward, as PPO's loss takes them."""
    torch.manual_seed(0)
    policy = apply_lora(model, LoraOptions(rank=4, alpha=8))
    critic = ValueModel(add_critic_adapter(policy))
    with torch.no_grad():  # non-zero lora_B and head, so both adapters change the forward and get gradients
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
        critic.head.weight.normal_()
    if checkpointing:
        enable_checkpointing(policy)
    rollout = generate_rollout(policy, tokenizer, rows_for(tokenizer), 2, 5, generator=torch.Generator().manual_seed(0))
    micro = rollout_tensors(rollout)
    policy.train()
    logp, _ = micro_logprobs(policy, micro, 1.0)
    values = micro_values(critic, micro)
    (logp.sum() + values.sum()).backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def test_checkpointing_recomputes_each_layer_with_its_own_adapter(tokenizer):
    model = load_causal_lm(ModelConfig(name="tiny_llama", **TINY), tokenizer)
    plain = adapter_grads(copy.deepcopy(model), False, tokenizer)
    checkpointed = adapter_grads(copy.deepcopy(model), True, tokenizer)
    assert {adapter_of(n) for n in plain if plain[n].abs().max() > 0} == {ACTOR, CRITIC}
    assert plain.keys() == checkpointed.keys()
    for name in plain:  # the plain pass shares each prompt's prefill, the checkpointed one cannot: rounding only
        scale = plain[name].abs().max().item()  # (a wrong adapter in the recompute is off by O(scale))
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6 * scale + 1e-6, msg=name)


def test_views_share_the_base_weights(tiny_model):
    policy = apply_lora(tiny_model, LoraOptions(rank=4, alpha=8))
    reference = AdapterView(policy, None).requires_grad_(False)
    critic = add_critic_adapter(policy)
    base_ids = {id(p) for n, p in policy.named_parameters() if adapter_of(n) is None}
    assert {id(p) for p in reference.parameters()} == base_ids  # the same tensors, not copies
    assert {id(p) for p in critic.parameters()} - base_ids == {id(p) for p in critic.parameters() if p.requires_grad}
    # freezing the reference view did not freeze the adapters it shares a model with
    assert all(p.requires_grad for n, p in policy.named_parameters() if adapter_of(n))


def test_lora_options_reject_bad_values():
    from conf.schema import ConfigError

    with pytest.raises(ConfigError, match="lm_head"):
        LoraOptions(target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match=r"trainer.lora.rank"):
        LoraOptions(rank=0)
    assert dataclasses.replace(LoraOptions(), rank=8).rank == 8
