"""The embedded tokenizer without the weights: a folder holding only the tokenizer and config files (what a GPU
pack carries) is enough for a model with random weights and the real tokenizer."""

from __future__ import annotations

import shutil

import pytest

from conf.schema import ModelConfig
from models.loading import cache_root, embedded_tokenizer_dir, load_causal_lm, load_tokenizer

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def test_random_weights_with_the_real_tokenizer_need_no_weights_file(tmp_path, monkeypatch):
    source = embedded_tokenizer_dir()  # this machine's converted cache
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    for name in FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    monkeypatch.setenv("RL_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path and embedded_tokenizer_dir() == target
    cfg = ModelConfig(name="tiny", source="random", hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.padding_side == "left" and len(tokenizer) > 49000
    model = load_causal_lm(cfg, tokenizer)
    assert model.config.vocab_size >= len(tokenizer)
    assert not (target / "model.safetensors").exists()  # nothing converted, nothing written


def test_a_folder_without_the_tokenizer_is_not_taken_for_one(tmp_path, monkeypatch):
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "config.json").write_text("{}")
    monkeypatch.setenv("RL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("models.loading.embedded_model_dir", lambda: pytest.fail("converts only without files"))
    with pytest.raises(pytest.fail.Exception):
        embedded_tokenizer_dir()
