"""The memory projection against the bytes of real tensors on the tiny model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algorithms.common import micro_logprobs, micro_values, rollout_tensors
from algorithms.grpo import GRPOConfig
from algorithms.ppo import PPOConfig
from algorithms.rollout import generate_rollout
from conf.registry import discover, get_stage, stage_names
from conf.schema import LoraOptions, ModelConfig, TrainerConfig
from models.loading import load_causal_lm
from models.logprobs import completion_logprobs
from models.lora import enable_checkpointing
from models.memory import DTYPE_BYTES, KNOWN_ARCHITECTURES, Architecture, architecture, project
from models.scale import model_config_for, prepare_policy
from tests.conftest import TINY, stage_context

ROOT = Path(__file__).resolve().parents[2]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied or shared weight counts once)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def build(algo_name: str, lora: bool, dtype: str, tokenizer, reward):
    """The registered builder of `algo_name` on a tiny model computing in `dtype`, loaded as run.py loads it
    (full fine-tuning in bf16 keeps fp32 master weights): (the algorithm, its optimisers, the weights' dtype)."""
    config = {"grpo": GRPOConfig, "ppo": PPOConfig}[algo_name]
    model_cfg = ModelConfig(name="tiny_llama", **{**TINY, "dtype": dtype})
    trainer = TrainerConfig(lora=LoraOptions(enabled=lora, rank=4, alpha=8))
    loaded = model_config_for(model_cfg, trainer)
    policy = prepare_policy(load_causal_lm(loaded, tokenizer), model_cfg, trainer)
    ctx = stage_context(
        policy,
        tokenizer,
        config(group_size=2, max_new_tokens=6),
        reward,
        train_rows=chat_rows(tokenizer),
        trainer=trainer,
    )
    built = get_stage(algo_name).build(ctx)
    return built.algorithm, built.optimizers, loaded.dtype


def chat_rows(tokenizer) -> list[dict]:
    return [
        {
            "prompt": tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi."}], tokenize=False, add_generation_prompt=True
            )
        }
    ]


@pytest.mark.parametrize(
    "algo_name, lora, dtype",
    [("ppo", False, "float32"), ("ppo", True, "bfloat16"), ("grpo", False, "bfloat16"), ("grpo", True, "float32")],
)
def test_weights_grads_and_optimizer_bytes_are_exact(algo_name, lora, dtype, tokenizer, letter_e_reward):
    algo, optimizers, weights_dtype = build(algo_name, lora, dtype, tokenizer, letter_e_reward)
    assert weights_dtype == ("float32" if not lora else dtype)  # full fine-tuning: fp32 master weights
    kept = get_stage(algo_name).models  # what the registry says the algorithm keeps besides the actor
    arch = architecture(ModelConfig(name="tiny_llama", **TINY), vocab_size=len(tokenizer))
    projected = project(
        arch,
        DTYPE_BYTES[weights_dtype],
        4 if lora else None,
        list(LoraOptions().target_modules),
        reference="reference" in kept,
        critic="critic" in kept,
    )
    assert (algo.reference is not None) == ("reference" in kept) and (algo.critic is not None) == ("critic" in kept)
    models = [m for m in (algo.policy, algo.reference, algo.critic) if m is not None]
    assert storage_bytes(p for m in models for p in m.parameters()) == sum(m.weights for m in projected)
    unique = {p.untyped_storage().data_ptr(): p for m in models for p in m.parameters()}
    assert sum(p.numel() for p in unique.values()) == sum(m.params for m in projected)

    # one backward through every trained model, then one optimiser step
    micro = rollout_tensors(generate_rollout(algo.policy, tokenizer, chat_rows(tokenizer), 2, 5))
    loss = micro_logprobs(algo.policy, micro, 1.0)[0].sum()
    if algo.critic is not None:
        loss = loss + micro_values(algo.critic, micro).sum()
    loss.backward()
    params = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
    assert storage_bytes(p.grad for p in params) == sum(m.grads for m in projected)
    for opt in optimizers.values():
        opt.step()
    moments = [s[k] for opt in optimizers.values() for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert storage_bytes(moments) == sum(m.optimizer for m in projected)


def saved_activation_bytes(model, input_ids, attention_mask, completion_len: int) -> int:
    """Bytes autograd keeps for backward in one training forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_logprobs(model, input_ids, attention_mask, completion_len)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpointed_activations_match_measured(dtype, tokenizer):
    B, Tp, Tc = 2, 24, 16
    ids = torch.randint(0, 1000, (B, Tp + Tc), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    measured = {}
    for layers in (2, 4):
        cfg = ModelConfig(name="tiny_llama", **{**TINY, "dtype": dtype, "num_hidden_layers": layers})
        model = load_causal_lm(cfg, tokenizer)
        enable_checkpointing(model)
        model.train()
        measured[layers] = saved_activation_bytes(model, ids, mask, Tc)
    arch = Architecture(len(tokenizer), 64, 128, 4, 4, 2, True)
    arch2 = Architecture(len(tokenizer), 64, 128, 2, 4, 2, True)
    b = DTYPE_BYTES[dtype]
    # each checkpointed layer keeps exactly its input: H values per token
    per_layer = (arch.activation_bytes_per_token(b, True) - arch2.activation_bytes_per_token(b, True)) * B * (Tp + Tc)
    assert measured[4] - measured[2] == per_layer
    # and the whole forward is the layers plus the fused lm_head's per-completion-token state (+ small terms)
    projected = arch.activation_bytes_per_token(b, True) * B * (Tp + Tc) + arch.logits_bytes_per_token() * B * Tc
    assert 0.9 * projected <= measured[4] <= 1.1 * projected


def test_a_random_llama_takes_the_8b_shapes(tokenizer):
    fields = KNOWN_ARCHITECTURES["deepseek-ai/DeepSeek-R1-Distill-Llama-8B"]
    random_8b = ModelConfig(name="r1", source="random", tokenizer="embedded", **fields)
    assert architecture(random_8b) == Architecture(**fields)
    # the same fields build that model: here at a tiny width, with the 8B's vocabulary size and untied lm_head
    tiny = {**TINY, "vocab_size": 50000, "tie_word_embeddings": False}
    model = load_causal_lm(ModelConfig(name="tiny", **tiny), tokenizer)
    assert model.lm_head.weight.shape == (50000, TINY["hidden_size"])
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    arch = architecture(ModelConfig(name="tiny", **tiny))
    assert sum(p.numel() for p in model.parameters()) == arch.num_params()


def rl_algorithms() -> tuple[str, ...]:
    discover()  # every registered algorithm, not only those this module imports
    return stage_names(kind="rl")


def test_memory_cli_prints_the_8b_tables():
    proc = subprocess.run(
        [sys.executable, "-m", "models.memory", "model=r1_distill_llama_8b", "trainer=h100"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.findall(r"^## (\S+)$", out, flags=re.MULTILINE) == [name.upper() for name in rl_algorithms()]
    assert "## GRPO" in out and "## PPO" in out and "critic adapter + head" in out
    assert "8.03 B params" in out  # Llama-3.1-8B's 8,030,261,248 parameters
    assert "| base (shared) | 8,030.3 M | 14.96 |" in out  # bf16: 2 bytes per weight


def test_memory_cli_divides_the_static_memory_over_fsdp_gpus():
    args = [
        sys.executable,
        "-m",
        "models.memory",
        "model=r1_distill_llama_8b",
        "trainer=h100",
        "trainer.lora.enabled=false",
        "trainer.strategy=fsdp",
    ]
    outs = []
    for extra in ([], ["--gpus", "8"]):
        proc = subprocess.run(args + extra, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout)
    totals = [float(t) for t in re.findall(r"\| \*\*all\*\* \| \| \| \| \| \*\*([0-9.]+)\*\* \|", outs[1])]
    per_gpu = [float(t) for t in re.findall(r"fsdp over 8 GPUs: ([0-9.]+) GiB", outs[1])]
    assert len(totals) == len(per_gpu) == len(rl_algorithms())  # one table per RL algorithm
    for total, shard in zip(totals, per_gpu):
        assert shard == pytest.approx(total / 8, abs=0.01)
    assert "fsdp over 1 GPUs" in outs[0]
    assert "+ 14.96 GiB of gathered actor weights" in outs[1]  # 8.03 B bf16 weights


def test_rollout_kv_line_sizes_the_cache_a_compiled_step_keeps():
    from conf.schema import compose_config
    from models.memory import GiB, rollout_kv_line

    cfg = compose_config(
        [
            "algo=grpo",
            "algo.prompts_per_step=4",
            "algo.group_size=4",
            "algo.rollout.max_batch=8",
            "data.max_prompt_tokens=100",
            "algo.max_new_tokens=40",
        ]
    )
    line = rollout_kv_line(cfg, kv_bytes_per_token=2**20)
    assert "8 sequences decoded at once x 140 tokens" in line and "256 when the step is compiled" in line
    assert f"= {8 * 256 * 2**20 / GiB:.2f} GiB" in line and "16 sequences per step in 2 chunk(s)" in line
