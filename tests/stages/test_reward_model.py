"""Reward-model training: preference pairs from rows, their tensors, Bradley-Terry separating an easy
preference set, and the stage's state for an exact resume."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from algorithms.losses import bradley_terry_loss
from models.forward import packed_passes
from models.heads import RewardModel, encode_texts
from stages.reward_model import (
    PreferencePair,
    RewardModelConfig,
    RewardModelTraining,
    bt_update,
    build_pairs,
    clip_references,
    evaluate_pairs,
    pair_scores,
    pair_tensors,
)
from tests.conftest import Recorder
from training.update import MicroBatch, OptimTarget

ROWS = [{"prompt": f"Q{i}: ", "reference": f"answer number {i} with several words in it"} for i in range(5)]


def test_bradley_terry_loss():
    loss, stats = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    logsigmoid = torch.nn.functional.logsigmoid
    expected = -(logsigmoid(torch.tensor(2.0)) + logsigmoid(torch.tensor(-1.0))) / 2
    torch.testing.assert_close(loss, expected)
    assert float(stats["accuracy"]) == 0.5 and float(stats["margin"]) == pytest.approx(0.5)


def test_pairs_other_response_come_from_another_row():
    pairs = build_pairs(ROWS, ROWS, "other_response", random.Random(0))
    assert [p.chosen for p in pairs] == [r["reference"] for r in ROWS]
    assert all(p.rejected != p.chosen and p.rejected in {r["reference"] for r in ROWS} for p in pairs)
    assert pairs == build_pairs(ROWS, ROWS, "other_response", random.Random(0))  # seeded


def test_pairs_truncated_and_policy_sample():
    truncated = build_pairs(ROWS[:1], ROWS, "truncated", random.Random(0), truncate_frac=0.5)[0]
    assert truncated.rejected == "answer number 0 with"  # 4 of 8 words
    single = build_pairs([{"prompt": "", "reference": "yes"}], ROWS, "truncated", random.Random(0))[0]
    assert single.rejected == ""  # always shorter than the reference
    sampled = build_pairs(ROWS[:2], ROWS, "policy_sample", random.Random(0), samples=["a", "b"])
    assert [p.rejected for p in sampled] == ["a", "b"]


def test_clip_references_cuts_long_and_drops_empty(tokenizer):
    rows = [{"reference": "word " * 50}, {"reference": ""}, {"reference": "short"}]
    clipped = clip_references(rows, tokenizer, max_tokens=5)
    assert len(clipped) == 2 and clipped[1]["reference"] == "short"
    assert len(tokenizer(clipped[0]["reference"], add_special_tokens=False)["input_ids"]) <= 5


def yes_no_pairs(n: int, seed: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        k = rng.randint(2, 8)
        prompt = f"Question {rng.randint(0, 999)}: is it fine?\n"
        pairs.append(PreferencePair(prompt, " ".join(["yes"] * k), " ".join(["no"] * rng.randint(2, 8))))
    return pairs


def test_bradley_terry_separates_yes_from_no(tiny_model, tokenizer):
    torch.manual_seed(0)
    rm = RewardModel.from_causal_lm(tiny_model)
    params = list(rm.parameters())
    target = OptimTarget(torch.optim.AdamW(params, lr=1e-3), params, max_grad_norm=1.0)
    held_out = yes_no_pairs(32, seed=1)
    before = evaluate_pairs(rm, tokenizer, held_out)
    for step in range(15):
        batch = pair_tensors(tokenizer, yes_no_pairs(8, seed=100 + step), rm.device)
        stats = bt_update(rm, batch, [target], micro_batch=4)
    after = evaluate_pairs(rm, tokenizer, held_out)
    assert after["accuracy"] > 0.9, (before, after)
    assert after["loss"] < before["loss"] and stats["loss"] < 0.6
    assert stats["optimizer_steps"] == 1 and stats["skipped_steps"] == 0  # what the loop's NaN guard counts


def test_pair_tensors_score_as_the_reward_scores_texts(tiny_model, tokenizer):
    """Chosen and rejected stay side by side under minibatch slicing, and score exactly as
    prompt + response texts do at RL time (models.heads.encode_texts)."""
    rm = RewardModel.from_causal_lm(tiny_model)
    pairs = yes_no_pairs(3, seed=0)
    batch = pair_tensors(tokenizer, pairs, rm.device)
    assert batch["input_ids"].shape[:2] == (3, 2) and batch["prompt_mask"].shape == (3, 0)
    with torch.no_grad():
        chosen, rejected = pair_scores(rm, {k: v[torch.tensor([2, 0])] for k, v in batch.items()})
        for row, i in enumerate((2, 0)):
            expected = rm.score(
                **encode_texts(tokenizer, [pairs[i].prompt] * 2, [pairs[i].chosen, pairs[i].rejected], rm.device)
            )  # [2]
            torch.testing.assert_close(torch.stack([chosen[row], rejected[row]]), expected, rtol=1e-5, atol=1e-5)


def test_a_non_finite_pair_loss_skips_the_step(tiny_model, tokenizer):
    rm = RewardModel.from_causal_lm(tiny_model)
    with torch.no_grad():
        rm.head.weight.fill_(float("nan"))
    params = [p for p in rm.parameters() if p.requires_grad]
    target = OptimTarget(torch.optim.AdamW(params, lr=1e-3), params, max_grad_norm=1.0)
    before = [p.detach().clone() for p in rm.backbone.parameters()]
    stats = bt_update(rm, pair_tensors(tokenizer, yes_no_pairs(4, seed=0), rm.device), [target], micro_batch=2)
    assert stats["optimizer_steps"] == 0 and stats["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, rm.backbone.parameters()))


def test_the_pair_rng_is_saved_and_restored(tmp_path, tokenizer):
    """The other_response picks continue where the checkpoint left them (through json, as the loop saves)."""
    cfg = SimpleNamespace(seed=0, trainer=SimpleNamespace(eval_batch_size=2, max_oom_retries=0))
    ctx = SimpleNamespace(cfg=cfg, policy=None, tokenizer=tokenizer, generator=None, run_dir=tmp_path)
    first, second, fresh = (RewardModelTraining(RewardModelConfig(), ctx, None, None, ROWS, []) for _ in range(3))
    first.make_pairs(ROWS, first.rng)  # one step's picks
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    next_pairs = first.make_pairs(ROWS, first.rng)
    assert next_pairs == second.make_pairs(ROWS, second.rng)
    assert next_pairs != fresh.make_pairs(ROWS, fresh.rng)  # a fresh rng would repeat the first step's picks


def test_pairs_in_token_budget_micro_batches_run_packed_on_the_same_gradient(tiny_model, tokenizer):
    """algo.micro_batch_tokens: pairs grouped by their real tokens, every score from a packed pass; the pair mean
    and its gradient are the padded path's."""
    rm = RewardModel.from_causal_lm(tiny_model)
    torch.nn.init.normal_(rm.head.weight, std=0.1)
    params = [p for p in rm.parameters() if p.requires_grad]
    pairs = [
        PreferencePair(f"Question {i}: " + "why " * (i % 3), "yes " * (1 + 3 * i), "no") for i in range(6)
    ]  # uneven lengths
    batch = pair_tensors(tokenizer, pairs, rm.device)
    grads = []
    for micro, budget in ((MicroBatch(6), 0), (MicroBatch(6, tokens=60), 60)):
        recorder = Recorder(params)
        with packed_passes(budget):
            stats = bt_update(rm, batch, [OptimTarget(recorder, params, max_grad_norm=1e9)], micro_batch=micro)
        assert stats["optimizer_steps"] == 1
        grads.append(recorder.grads[0])
    assert len(MicroBatch(6, tokens=60).split(batch, torch.arange(6))) > 1  # the budget cut the batch
    for packed, padded in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)
