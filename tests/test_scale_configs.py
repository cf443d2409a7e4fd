"""The 8B settings (trainer=h100: bf16, LoRA, activation checkpointing; R1's chat template) end to end
on the tiny random Llama, offline, as `python run.py` runs them."""

from __future__ import annotations

import json

import pytest

from algorithms.grpo import GRPOConfig
from conf.registry import get_stage
from conf.schema import ModelConfig, TrainerConfig
from models.loading import ModelLoadError, load_tokenizer
from tests.conftest import TINY, stage_context
from tests.test_run import read_metrics, run_py

H100_ON_TINY = [
    "model=tiny_llama",
    "trainer=h100",
    "model.chat_template=r1_distill",
    "trainer.device=cpu",
    "trainer.threads=1",
    "trainer.max_steps=1",
    "algo.max_new_tokens=6",
    "algo.prompts_per_step=2",
    "data.eval_size=2",
    "trainer.eval_batch_size=2",
]


def test_r1_chat_template_renders_r1_turns():
    tokenizer = load_tokenizer(ModelConfig(name="tiny_llama", **TINY, chat_template="r1_distill"))
    text = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "<think>hmm</think>Because."},
            {"role": "user", "content": "Sure?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        f"{tokenizer.bos_token or ''}Be brief.<｜User｜>Why?<｜Assistant｜>Because."
        "<｜end▁of▁sentence｜><｜User｜>Sure?<｜Assistant｜><think>\n"
    )


@pytest.mark.parametrize(
    "precision, option, expected",
    [("bf16", None, True), ("fp32", None, False), ("bf16", False, False), ("fp32", True, True)],
)
def test_old_logprobs_are_recomputed_in_bf16(precision, option, expected, tiny_model, tokenizer):
    """null: the sampling-time log-probs serve in fp32; in bf16 (trainer=h100) they round apart from the training
    pass's, so the ratio would not start at 1 and a no-grad pass recomputes them."""
    ctx = stage_context(
        tiny_model,
        tokenizer,
        GRPOConfig(recompute_old_logp=option),
        train_rows=[{"prompt": "Hi."}],
        trainer=TrainerConfig(precision=precision),
    )
    assert get_stage("grpo").build(ctx).algorithm.cfg.recompute_old_logp is expected


def test_unknown_chat_template_names_the_valid_ones():
    with pytest.raises(ModelLoadError, match="choose one of: r1_distill"):
        load_tokenizer(ModelConfig(name="tiny_llama", **TINY, chat_template="nope"))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_h100_settings_on_the_tiny_model(algo, tmp_path):
    out = tmp_path / "run"
    extra = (
        ["algo.group_size=2"]
        if algo == "grpo"
        else ["algo.group_size=2", "algo.minibatch_size=4", "algo.micro_batch_size=2"]
    )
    proc = run_py([f"algo={algo}", *H100_ON_TINY, *extra, f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = [m for m in read_metrics(out) if "reward/total_mean" in m][-1]
    assert last["optimizer_steps"] >= 1 and last["skipped_steps"] == 0
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].endswith("<｜Assistant｜><think>\n")
    final = out / "checkpoints" / "final"
    weights = sorted(p.relative_to(final).as_posix() for p in final.rglob("*.safetensors"))
    expected = ["adapter_model.safetensors"]
    if algo == "ppo":
        expected += ["critic/adapter_model.safetensors", "critic/head.safetensors"]
    assert weights == expected  # adapters and the head, never the 8B base
