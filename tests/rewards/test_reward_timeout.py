"""reward.timeout_s: a reward that sleeps or hangs past it scores 0 for the batch, counted as a timeout;
its call is abandoned in a thread and not started again while it still runs."""

from __future__ import annotations

import threading
import time

import pytest

from conf.schema import ConfigError, RewardConfig, load_choice
from rewards import CombinedReward, build_reward


def rows(n: int) -> list[dict]:
    return [{"answer": "yes", "kind": "open", "id": i} for i in range(n)]


def score(reward: CombinedReward, completions: list[str]):
    start = time.monotonic()
    out = reward(["q"] * len(completions), completions, rows(len(completions)))
    return out, time.monotonic() - start


def test_a_sleeping_reward_scores_zero_and_is_counted():
    def sleeps(prompts, completions, **_):
        time.sleep(3)
        return [1.0] * len(completions)

    reward = CombinedReward({"sleeps": 1.0, "format_soft": 1.0}, extra={"sleeps": sleeps}, timeout_s=0.2)
    out, elapsed = score(reward, ["<think>a</think>b", "c", "d"])
    assert elapsed < 2  # not the 3 s the function sleeps
    assert out.parts["sleeps"].tolist() == [0.0, 0.0, 0.0]
    assert out.timeouts == {"sleeps": 3, "format_soft": 0} and out.failures == {"sleeps": 0, "format_soft": 0}
    assert out.total.tolist() == out.parts["format_soft"].tolist()  # the other reward is untouched


def test_a_hung_call_is_not_started_again_until_it_returns():
    release, calls = threading.Event(), []

    def hangs(prompts, completions, **_):
        calls.append(len(completions))
        release.wait(30)
        return [1.0] * len(completions)

    reward = CombinedReward({"hangs": 1.0}, extra={"hangs": hangs}, timeout_s=0.1)
    try:
        first, _ = score(reward, ["a", "b"])
        second, elapsed = score(reward, ["a", "b", "c"])
        assert first.timeouts == {"hangs": 2} and second.timeouts == {"hangs": 3}
        assert calls == [2] and elapsed < 0.1  # the second batch did not start a second call, nor wait
    finally:
        release.set()
    for thread in threading.enumerate():  # the abandoned call, a daemon thread named after the function
        if thread.name == "reward-hangs":
            thread.join(5)
    third, _ = score(reward, ["a"])  # it returned: the reward is called again
    assert third.parts["hangs"].tolist() == [1.0] and third.timeouts == {"hangs": 0} and calls == [2, 1]


def test_a_fast_reward_and_errors_under_a_time_limit():
    def flaky(prompts, completions, **_):
        if any("boom" in c for c in completions):
            raise RuntimeError("cannot score")
        return [1.0] * len(completions)

    reward = CombinedReward({"flaky": 1.0}, extra={"flaky": flaky}, timeout_s=5)
    out, _ = score(reward, ["ok", "boom", "ok"])
    assert out.parts["flaky"].tolist() == [1.0, 0.0, 1.0]  # errors are isolated sample by sample as before
    assert out.failures == {"flaky": 1} and out.timeouts == {"flaky": 0}


def test_the_per_sample_retry_shares_the_batch_deadline():
    def slow_sample(prompts, completions, **_):
        if len(completions) > 1:
            raise RuntimeError("batch failed")  # -> scored sample by sample
        if completions[0] == "slow":
            time.sleep(2)
        return [1.0]

    reward = CombinedReward({"r": 1.0}, extra={"r": slow_sample}, timeout_s=0.3)
    out, elapsed = score(reward, ["ok", "slow", "ok"])
    assert elapsed < 1.5
    assert out.parts["r"].tolist() == [1.0, 0.0, 0.0]  # the samples after the deadline are not scored either
    assert out.failures == {"r": 0} and out.timeouts == {"r": 2}


def test_without_a_limit_nothing_changes():
    out, _ = score(CombinedReward({"format_soft": 1.0}), ["a"])
    assert out.timeouts == {}  # no reward/<name>_timeouts keys in the logs


def test_timeout_config():
    assert RewardConfig().timeout_s is None
    with pytest.raises(ConfigError, match=r"reward.timeout_s=0 must be a positive number of seconds, or null"):
        RewardConfig(timeout_s=0)
    with pytest.raises(ConfigError, match=r"reward\.timeout_s=-1"):
        CombinedReward({"format": 1.0}, timeout_s=-1)
    cfg = load_choice("reward", "medical", ["reward.timeout_s=2.5"])
    assert build_reward(cfg).timeout_s == 2.5
