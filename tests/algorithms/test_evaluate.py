"""Eval metrics combined over batches: extremes of extremes, sums of counts, weighted means."""

from __future__ import annotations

import pytest

from algorithms.evaluate import combine_batches


def test_combine_batches_hand_computed():
    batches = [(8, {"reward/total_mean": 0.5, "completion/length_max": 40.0, "completion/length_min": 3.0,
                    "tokens/generated": 200.0, "reward/format_failures": 1.0}),
               (2, {"reward/total_mean": 1.0, "completion/length_max": 12.0, "completion/length_min": 1.0,
                    "tokens/generated": 20.0, "reward/format_failures": 2.0})]
    assert combine_batches("reward/total_mean", batches, 10) == pytest.approx((8 * 0.5 + 2 * 1.0) / 10)
    assert combine_batches("completion/length_max", batches, 10) == 40.0
    assert combine_batches("completion/length_min", batches, 10) == 1.0
    assert combine_batches("tokens/generated", batches, 10) == 220.0
    assert combine_batches("reward/format_failures", batches, 10) == 3.0
