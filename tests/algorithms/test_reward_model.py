"""Reward-model training: preference pairs from rows, and Bradley-Terry separating an easy preference set."""

from __future__ import annotations

import random

import pytest
import torch

from algorithms.losses import bradley_terry_loss
from algorithms.reward_model import PreferencePair, bt_step, build_pairs, clip_references, evaluate_pairs
from models.heads import RewardModel

ROWS = [{"prompt": f"Q{i}: ", "reference": f"answer number {i} with several words in it"} for i in range(5)]


def test_bradley_terry_loss():
    loss, stats = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    expected = -(torch.nn.functional.logsigmoid(torch.tensor(2.0)) + torch.nn.functional.logsigmoid(torch.tensor(-1.0))) / 2
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
    optimizer = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    held_out = yes_no_pairs(32, seed=1)
    before = evaluate_pairs(rm, tokenizer, held_out)
    for step in range(15):
        stats = bt_step(rm, tokenizer, yes_no_pairs(8, seed=100 + step), optimizer, micro_batch_size=4,
                        max_grad_norm=1.0)
    after = evaluate_pairs(rm, tokenizer, held_out)
    assert after["accuracy"] > 0.9, (before, after)
    assert after["loss"] < before["loss"] and stats["loss"] < 0.6
