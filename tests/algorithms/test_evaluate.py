"""Eval metrics combined over batches (extremes of extremes, sums of counts, weighted means), and k samples
per prompt: pass@k against its definition, majority votes, per-prompt records by hand, and the metrics of
a k-sample eval on the tiny Llama."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from algorithms.evaluate import (
    combine_batches,
    evaluate_policy,
    majority_choice,
    pass_at_k,
    pass_metrics,
    prompt_results,
)
from algorithms.rollout import Rollout
from rewards import CombinedReward
from rewards.combine import RewardOutput


def test_combine_batches_hand_computed():
    batches = [
        (
            8,
            {
                "reward/total_mean": 0.5,
                "completion/length_max": 40.0,
                "completion/length_min": 3.0,
                "tokens/generated": 200.0,
                "reward/format_failures": 1.0,
            },
        ),
        (
            2,
            {
                "reward/total_mean": 1.0,
                "completion/length_max": 12.0,
                "completion/length_min": 1.0,
                "tokens/generated": 20.0,
                "reward/format_failures": 2.0,
            },
        ),
    ]
    assert combine_batches("reward/total_mean", batches, 10) == pytest.approx((8 * 0.5 + 2 * 1.0) / 10)
    assert combine_batches("completion/length_max", batches, 10) == 40.0
    assert combine_batches("completion/length_min", batches, 10) == 1.0
    assert combine_batches("tokens/generated", batches, 10) == 220.0
    assert combine_batches("reward/format_failures", batches, 10) == 3.0


def pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """The share of the k-subsets of n samples (c of them passing) that hold a passing one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    "n, c, k", [(1, 0, 1), (1, 1, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (6, 0, 3), (6, 4, 3), (8, 3, 8)]
)
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_by_enumeration(n, c, k))
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_one_is_the_pass_rate_and_too_few_samples_is_an_error():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="at least 4 samples"):
        pass_at_k(3, 1, 4)


def test_majority_choice_votes_on_the_extracted_letters():
    options = {"A": "aspirin", "B": "heparin", "C": "warfarin"}
    assert majority_choice(["<think>x</think>B", "The answer is C", "(B)", "nothing"], options) == "B"
    assert majority_choice(["A", "C", "C", "A"], options) == "A"  # a tie: the letter named first
    assert majority_choice(["warfarin", "no idea"], options) == "C"  # an option's text counts
    assert majority_choice(["no idea", "none"], options) is None


def rollout_of(rows: list[dict], completions: list[str], k: int) -> Rollout:
    n = len(completions)
    z = torch.zeros(n, 1, dtype=torch.long)
    return Rollout(
        z,
        z + 1,
        z,
        z + 1,
        z.float(),
        torch.zeros(n, dtype=torch.bool),
        ["p"] * n,
        completions,
        [r for r in rows for _ in range(k)],
    )


def test_prompt_results_and_metrics_by_hand():
    options = {"A": "x", "B": "y", "C": "z"}
    rows = [
        {"id": "0", "question": "q0", "answer": "B", "kind": "mcq", "options": options},
        {"id": "1", "question": "q1", "answer": "A", "kind": "mcq", "options": options},
    ]
    completions = [
        "<think>t</think>B",
        "C",
        "B",  # prompt 0: 2 of 3 correct, majority B (correct)
        "C",
        "C",
        "A",
    ]  # prompt 1: 1 of 3 correct, majority C (wrong)
    accuracy = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    scored = RewardOutput(accuracy * 2, {"accuracy": accuracy}, {})
    records = prompt_results([(rollout_of(rows, completions, 3), scored)], k=3)
    assert [r["passed"] for r in records] == [2, 1]
    assert records[0]["pass@1"] == pytest.approx(2 / 3) and records[0]["pass@3"] == 1.0
    assert [r["majority"] for r in records] == ["B", "C"] and [r["majority_correct"] for r in records] == [True, False]
    assert records[0]["format_rate"] == pytest.approx(1 / 3) and records[1]["format_rate"] == 0.0
    assert records[0]["reward_mean"] == pytest.approx(4 / 3) and records[0]["id"] == "0"
    metrics = pass_metrics(records, 3)
    assert metrics == pytest.approx({"format_rate": 1 / 6, "pass@1": 0.5, "pass@3": 1.0, "maj@3": 0.5})
    # a threshold below 1 passes partial credit; no accuracy part, no pass metrics
    partial = RewardOutput(accuracy, {"accuracy": accuracy * 0.6}, {})
    assert prompt_results([(rollout_of(rows, completions, 3), partial)], 3, pass_threshold=0.5)[0]["passed"] == 2
    no_accuracy = RewardOutput(accuracy, {"format": accuracy}, {})
    assert "pass@1" not in pass_metrics(prompt_results([(rollout_of(rows, completions, 3), no_accuracy)], 3), 3)


def test_strict_format_rate_and_pass_at_k_by_hand():
    rows = [{"id": "0", "question": "q0"}, {"id": "1", "question": "q1"}]
    strict = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # prompt 0: 1 of 4; prompt 1: 2 of 4
    scored = RewardOutput(strict, {"format_strict": strict}, {})
    records = prompt_results([(rollout_of(rows, ["x"] * 8, 4), scored)], k=4)
    assert [r["format_strict_rate"] for r in records] == [0.25, 0.5]
    assert [r["format_strict_pass@4"] for r in records] == [1.0, 1.0]
    metrics = pass_metrics(records, 4)
    assert metrics["format_strict_rate"] == pytest.approx(0.375) and metrics["format_strict_pass@4"] == 1.0
    none = RewardOutput(strict, {"format": strict}, {})  # no strict part: no strict metrics
    assert "format_strict_rate" not in pass_metrics(prompt_results([(rollout_of(rows, ["x"] * 8, 4), none)], 4), 4)


def test_k_samples_per_prompt_on_the_tiny_llama(tiny_model, tokenizer):
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Pick {i}: A or B?"}], tokenize=False, add_generation_prompt=True
        )
        for i in range(3)
    ]
    rows = [
        {"id": str(i), "prompt": p, "question": p, "answer": "A", "kind": "mcq", "options": {"A": "a", "B": "b"}}
        for i, p in enumerate(prompts)
    ]
    reward = CombinedReward({"format": 1.0, "accuracy": 1.0})
    sampling = {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0}
    metrics, batches = evaluate_policy(
        tiny_model, tokenizer, rows, reward, sampling, batch_size=2, seed=0, samples_per_prompt=3
    )
    assert sum(len(r.completions) for r, _ in batches) == 9  # 3 prompts x k = 3, group-contiguous
    assert all(r.rows[0] is r.rows[2] for r, _ in batches)
    assert {"pass@1", "pass@3", "maj@3", "format_rate", "reward/total_mean"} <= set(metrics)
    assert {"completion/think_words_median", "completion/recheck_frac", "completion/eos_frac"} <= set(metrics)
    assert 0.0 <= metrics["pass@1"] <= metrics["pass@3"] <= 1.0
    one, _ = evaluate_policy(tiny_model, tokenizer, rows, reward, sampling, batch_size=2, seed=0)
    assert "pass@1" in one and "pass@3" not in one and "maj@1" not in one  # k = 1: today's single sample
