"""Shared fixtures: the embedded tokenizer and a tiny random Llama (seconds on a CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # the Triton kernels' tests run under Triton's interpreter on a CPU; it has to be switched on before
    # anything imports triton (loading transformers' models does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conf.registry import discover
from conf.schema import Config, DataConfig, LoggerConfig, ModelConfig, RewardConfig, TrainerConfig
from models.loading import load_causal_lm, load_tokenizer
from models.shapes import TINY_LLAMA
from training.loop import StageContext

discover()  # every stage registers its config, so that Hydra can compose conf/algo/* (as run.py does)

TINY = TINY_LLAMA


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(ModelConfig(name="tiny_llama", **TINY))


@pytest.fixture()
def tiny_model(tokenizer):
    return load_causal_lm(ModelConfig(name="tiny_llama", **TINY), tokenizer)


@pytest.fixture(autouse=True)
def one_thread():
    # a 64-wide model gains nothing from threads, and loses a lot on a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def letter_e(prompts, completions, **_):
    """Synthetic verifiable task: the share of the letter 'e' among up to 40 characters."""
    return [min(c.lower().count("e") / 40.0, 1.0) for c in completions]


@pytest.fixture()
def letter_e_reward():
    """A combined reward of the synthetic task alone, for the learning tests."""
    from rewards import CombinedReward

    return CombinedReward({"letter_e": 1.0}, extra={"letter_e": letter_e})


def stage_context(
    policy,
    tokenizer,
    algo_cfg,
    reward_fn=None,
    seed: int = 0,
    train_rows=(),
    eval_rows=(),
    trainer: TrainerConfig | None = None,
) -> StageContext:
    """What a registered builder receives, for a tiny model outside run.py (no logger, no run dir)."""
    cfg = Config(
        model=ModelConfig(name="tiny_llama", **TINY),
        data=DataConfig(),
        reward=RewardConfig(),
        algo=algo_cfg,
        trainer=trainer or TrainerConfig(),
        logger=LoggerConfig(mode="disabled"),
        seed=seed,
    )
    return StageContext(
        cfg,
        run_dir=None,
        policy=policy,
        tokenizer=tokenizer,
        train_rows=list(train_rows),
        eval_rows=list(eval_rows),
        reward_fn=reward_fn,
        generator=torch.Generator().manual_seed(seed),
    )


def say_rows(tokenizer, n: int = 4) -> list[dict]:
    """n chat prompts ("Say something i."), the learning tests' data."""
    return [
        {
            "prompt": tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Say something {i}."}], tokenize=False, add_generation_prompt=True
            )
        }
        for i in range(n)
    ]


def learn(builder, algo_cfg, model, tokenizer, reward, steps: int, seed: int = 0, lr: float = 1e-2) -> list[dict]:
    """`steps` steps of a registered builder's algorithm on say_rows (reference, AdamW and sampler as run.py
    builds them); each step's metrics."""
    torch.manual_seed(seed)
    ctx = stage_context(
        model, tokenizer, algo_cfg, reward, seed, train_rows=say_rows(tokenizer), trainer=TrainerConfig(lr=lr)
    )
    built = builder(ctx)
    return [built.algorithm.step(built.sampler.draw()).metrics for _ in range(steps)]


class Recorder:
    """Stands in for an optimiser: keeps the accumulated gradients at step()."""

    def __init__(self, params):
        self.params, self.grads = list(params), []

    def step(self):
        self.grads.append([p.grad.clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None
