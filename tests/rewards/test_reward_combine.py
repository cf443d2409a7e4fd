"""CombinedReward: weighted totals, failure isolation, config validation, the shipped YAML files."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conf.schema import ConfigError, load_choice
from rewards import REWARDS, CombinedReward, build_reward, register

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = (
    "accuracy, format, format_soft, format_strict, keyword, language, language_consistency, length, similarity, "
    "think_closed"
)


def rows(n, **extra):
    return [{"answer": "yes", "kind": "open", "id": i, **extra} for i in range(n)]


def test_weighted_total_by_hand():
    reward = CombinedReward({"format": 2.0, "keyword": 0.5}, {"keyword": {"keyword": "yes", "target": 2}})
    completions = ["<think>r</think>yes", "yes yes yes", ""]
    out = reward(["q"] * 3, completions, rows(3))
    assert out.parts["format"].tolist() == [1.0, 0.0, 0.0]
    assert out.parts["keyword"].tolist() == [0.5, 1.0, 0.0]
    # 2 * 1 + 0.5 * 0.5 = 2.25; 2 * 0 + 0.5 * 1 = 0.5; 0
    assert out.total.tolist() == pytest.approx([2.25, 0.5, 0.0])
    assert out.total.dtype == torch.float32 and out.total.shape == (3,)
    assert out.failures == {"format": 0, "keyword": 0}


def test_zero_weight_is_logged_not_trained_on():
    out = CombinedReward({"format": 0.0, "format_soft": 1.0})(["q"], ["<think>r</think>a"], rows(1))
    assert out.parts["format"].tolist() == [1.0] and out.total.tolist() == [1.0]


def test_raising_reward_scores_zero_only_for_failing_samples():
    def flaky(prompts, completions, **_):
        if any("boom" in c for c in completions):
            raise RuntimeError("cannot score")
        return [1.0] * len(completions)

    reward = CombinedReward({"flaky": 1.0, "format_soft": 1.0}, extra={"flaky": flaky})
    out = reward(["q"] * 3, ["ok", "boom", "ok"], rows(3))
    assert out.parts["flaky"].tolist() == [1.0, 0.0, 1.0]
    assert out.failures == {"flaky": 1, "format_soft": 0}


def test_registered_raising_reward_is_isolated_too():
    @register("_test_first_char")
    def first_char(prompts, completions, **_):
        return [float(c[0] == "y") for c in completions]  # IndexError on an empty completion

    try:
        out = CombinedReward({"_test_first_char": 1.0})(["q"] * 3, ["yes", "", "no"], rows(3))
        assert out.total.tolist() == [1.0, 0.0, 0.0] and out.failures == {"_test_first_char": 1}
    finally:
        del REWARDS["_test_first_char"]


def test_non_finite_and_non_numeric_scores_are_zero_and_counted():
    def bad_values(prompts, completions, **_):
        return [1.0, math.nan, math.inf, "x"]

    out = CombinedReward({"bad": 1.0}, extra={"bad": bad_values})(["q"] * 4, ["a"] * 4, rows(4))
    assert out.total.tolist() == [1.0, 0.0, 0.0, 0.0] and out.failures == {"bad": 3}


def test_wrong_length_is_a_failure_for_the_whole_batch():
    def one_score(prompts, completions, **_):
        return [1.0]

    out = CombinedReward({"short": 1.0}, extra={"short": one_score})(["q"] * 3, ["a"] * 3, rows(3))
    assert out.total.tolist() == [0.0, 0.0, 0.0] and out.failures == {"short": 3}


def test_columns_options_and_tensor_results():
    seen = {}

    def spy(prompts, completions, answer, cot, scale=1.0, **columns):
        seen.update(answer=answer, cot=cot, columns=columns)
        return torch.tensor([scale * len(c) for c in completions])  # the reward model returns tensors

    reward = CombinedReward({"spy": 1.0}, {"spy": {"scale": 2.0}}, extra={"spy": spy})
    out = reward(["p1", "p2"], ["ab", "abc"], [{"answer": "x", "cot": "c"}, {"answer": "y"}])
    assert out.total.tolist() == [4.0, 6.0]
    assert seen["answer"] == ["x", "y"] and seen["cot"] == ["c", None]  # missing key -> None


def test_empty_batch():
    out = CombinedReward({"format": 1.0})([], [], [])
    assert out.total.shape == (0,) and out.parts["format"].shape == (0,) and out.failures == {"format": 0}


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError, match=f"valid names: {SHIPPED}"):
        CombinedReward({"format": 1.0, "fromat": 1.0})
    with pytest.raises(ConfigError, match="extra="):  # reward_model comes from the training code
        CombinedReward({"reward_model": 1.0})
    scorer = lambda prompts, completions, **_: [0.5] * len(completions)  # noqa: E731
    reward = CombinedReward({"reward_model": 1.0}, extra={"reward_model": scorer})
    assert reward(["q"], ["a"], rows(1)).total.tolist() == [0.5]


def test_config_errors():
    with pytest.raises(ConfigError, match=r"no entry in reward.weights"):
        CombinedReward({"format": 1.0}, {"accuracy": {"metric": "f1"}})
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['metrc'\]; valid: \['metric'\]"):
        CombinedReward({"accuracy": 1.0}, {"accuracy": {"metrc": "f1"}})
    with pytest.raises(ConfigError, match="f1, exact, contains"):  # values are checked at build time
        CombinedReward({"accuracy": 1.0}, {"accuracy": {"metric": "bleu"}})
    with pytest.raises(ConfigError, match="keyword"):  # a required option is missing
        CombinedReward({"keyword": 1.0})
    with pytest.raises(ConfigError, match="empty"):
        CombinedReward({})
    with pytest.raises(ConfigError, match="finite"):
        CombinedReward({"format": float("nan")})


def test_register_rejects_a_second_function_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register("format")(lambda prompts, completions, **_: [])
    assert register("format")(REWARDS["format"]) is REWARDS["format"]  # same function: fine


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "reward").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_build(path):
    typed = load_choice("reward", path.stem)
    assert typed.name == path.stem
    node = OmegaConf.structured(typed)
    # the learned reward model comes from the training code (run.py loads it from reward.path)
    extra = {"reward_model": lambda prompts, completions, **_: [0.0] * len(completions)}
    for cfg in (typed, node):  # a typed RewardConfig or the raw DictConfig
        reward = build_reward(cfg, extra=extra if "reward_model" in node.weights else None)
        out = reward(["q"], ["<think>r</think>the answer"], rows(1, reference="the answer"))
        assert set(out.parts) == set(node.weights) and not any(out.failures.values())
