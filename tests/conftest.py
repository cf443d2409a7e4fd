"""Shared fixtures: the embedded tokenizer and a tiny random Llama (seconds on a CPU)."""

from __future__ import annotations

import pytest

from conf.schema import ModelConfig
from models.loading import load_causal_lm, load_tokenizer

TINY = dict(source="random", tokenizer="embedded", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, init_seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(ModelConfig(name="tiny_llama", **TINY))


@pytest.fixture()
def tiny_model(tokenizer):
    return load_causal_lm(ModelConfig(name="tiny_llama", **TINY), tokenizer)
