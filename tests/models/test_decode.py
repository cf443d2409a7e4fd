"""The static-cache decode step (models.decode): how often it compiles, and the dtype its attention runs in."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import models.decode
from algorithms.rollout import RolloutConfig, _compiled, generate_rollout
from models.decode import StaticDecoder
from models.scale import autocast_forward
from tests.algorithms.test_rollout import eos_biased


def chat_rows(tokenizer, questions):
    template = [{"role": "user", "content": ""}]
    return [
        {
            "prompt": tokenizer.apply_chat_template(
                [{**template[0], "content": q}], tokenize=False, add_generation_prompt=True
            )
        }
        for q in questions
    ]


def seeded() -> torch.Generator:
    """The draws of every rollout here fixed, whatever ran before in the process (which rows stop when)."""
    return torch.Generator().manual_seed(0)


def test_compaction_and_cache_growth_compile_the_step_once(tiny_model, tokenizer, monkeypatch):
    # dynamo's compile count does not depend on the backend: "eager" skips inductor's code generation
    monkeypatch.setattr(StaticDecoder, "BACKEND", "eager")
    eos_biased(tiny_model, tokenizer, 9.0)
    cfg = RolloutConfig(compile="true", compact_below=0.99)  # compaction as soon as a row stops: 16, 8, 4, 2
    counters.clear()
    lengths, batches = set(), []
    decoder_step = StaticDecoder.step

    def step(self, cache, *args):
        batches.append(cache.batch)
        return decoder_step(self, cache, *args)

    monkeypatch.setattr(StaticDecoder, "step", step)
    # 16 rows, then 12 (another chunk size), then prompts and completions long enough to grow the cache past 128
    for questions, group, new_tokens in [(["Hi.", "Why?"], 8, 24), (["A longer question.", "No.", "x"], 4, 24)]:
        rows = chat_rows(tokenizer, questions)
        generate_rollout(tiny_model, tokenizer, rows, group, new_tokens, generator=seeded(), rollout=cfg)
        lengths.add(_compiled[tiny_model]["default"]._storage.length)
    rows = chat_rows(tokenizer, ["Q " * 60, "y"])
    generate_rollout(tiny_model, tokenizer, rows, 8, 120, generator=seeded(), rollout=cfg)
    lengths.add(_compiled[tiny_model]["default"]._storage.length)
    assert lengths == {128, 256} and {16, 12, 8, 4, 2} <= set(batches), (lengths, sorted(set(batches)))
    assert 1 not in batches  # compaction keeps two rows: one would be a compile of its own
    # before the rows and cache length were dynamic: one compile per (rows, length), 10 in a similar scenario
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_attention_runs_in_the_cache_dtype_under_autocast(tiny_model, tokenizer, monkeypatch):
    """fp32 master weights under bf16 autocast: q is cast to the bf16 cache, not the cache to fp32 q, and the
    draws are those of the former formula (autocast cast the upcast cache back to bf16 for the matmul)."""
    autocast_forward(tiny_model, torch.bfloat16)
    autocast_forward(tiny_model.get_decoder(), torch.bfloat16)
    eos_biased(tiny_model, tokenizer, 9.0)
    cfg = RolloutConfig(compile="false", pack="false")
    rows = chat_rows(tokenizer, ["Hi.", "A much longer question, so that left padding is needed here.", "Why?"])

    def decode():
        return generate_rollout(tiny_model, tokenizer, rows, 4, 12, prompt_seeds=[5, 6, 7], rollout=cfg)

    attention = models.decode.cached_attention
    seen: list[tuple[torch.dtype, ...]] = []

    def spy(q, k, v, valid, scale):
        matmul = torch.matmul

        def recording(a, b):
            seen.append((a.dtype, b.dtype))
            return matmul(a, b)

        with monkeypatch.context() as m:
            m.setattr(torch, "matmul", recording)
            return attention(q, k, v, valid, scale)

    monkeypatch.setattr(models.decode, "cached_attention", spy)
    got = decode()
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}, set(seen)

    def upcasting(q, k, v, valid, scale):  # the former formula: the cache cast to q's dtype (fp32 here)
        n, hq, _, d = q.shape
        hkv = k.shape[1]
        assert q.dtype == torch.float32 and k.dtype == torch.bfloat16  # what made it a whole-cache copy per layer
        q = q.reshape(n, hkv, hq // hkv, d)
        scores = torch.matmul(q, k.to(q.dtype).transpose(-1, -2)).float() * scale
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(weights, v.to(q.dtype)).reshape(n, 1, hq * d)

    monkeypatch.setattr(models.decode, "cached_attention", upcasting)
    reference = decode()
    assert torch.equal(got.completion_ids, reference.completion_ids)
    assert torch.equal(got.completion_mask, reference.completion_mask)
    torch.testing.assert_close(got.logp, reference.logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_without_autocast_keeps_its_dtype(dtype):
    q, k, v = torch.randn(3, 4, 1, 8, dtype=dtype), torch.randn(3, 2, 5, 8, dtype=dtype), torch.randn(3, 2, 5, 8)
    valid = torch.ones(3, 5, dtype=torch.bool)
    out = models.decode.cached_attention(q, k, v.to(dtype), valid, 0.3)
    assert out.dtype == dtype and out.shape == (3, 1, 32)


def test_compiled_step_skips_module_guards_and_keeps_one_model_per_code(tiny_model, tokenizer, monkeypatch):
    """The step's guards leave out the model's modules (each parameter's, each module's: ~1.2 of 1.3 ms per step at
    32 LoRA layers), keeping those on the cache and the step's inputs; each decoder compiles its own code, so that
    another model (here one whose lm_head has a bias) never runs on an entry compiled for the first."""
    monkeypatch.setattr(StaticDecoder, "BACKEND", "eager")
    skip = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    kept: list[str] = []

    def spy(entries):
        keep = skip(entries)
        kept.extend(e.guard_type for e, k in zip(entries, keep, strict=True) if k)
        return keep

    monkeypatch.setattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", spy)
    cfg, eager = RolloutConfig(compile="true"), RolloutConfig(compile="false", pack="false")
    rows = chat_rows(tokenizer, ["Hi.", "Why?"])

    def decode(model, rollout):
        return generate_rollout(model, tokenizer, rows, 4, 12, prompt_seeds=[5, 6], rollout=rollout)

    plain = decode(tiny_model, cfg)
    layers = len(tiny_model.model.layers)
    # tensors guarded: the cache (keys and values per layer, valid), token, position, slot, uniform; no parameter
    assert kept.count("TENSOR_MATCH") == 2 * layers + 5, kept
    assert torch.equal(plain.completion_ids, decode(tiny_model, eager).completion_ids)
    other = type(tiny_model)(tiny_model.config)
    other.load_state_dict(tiny_model.state_dict())
    eos_biased(other, tokenizer, 9.0)
    biased = decode(other.eval(), cfg)
    assert torch.equal(biased.completion_ids, decode(other, eager).completion_ids)
    assert not torch.equal(biased.completion_ids, plain.completion_ids)  # the bias counted: not the first's entry
