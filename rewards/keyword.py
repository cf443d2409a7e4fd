"""A synthetic, verifiable reward for learning tests: does the policy learn to say a keyword?"""

from __future__ import annotations

import re

from conf.schema import ConfigError, check_choice, check_range
from rewards.registry import register

MODES = ("count", "any")


def count_keyword(text: str, keyword: str) -> int:
    """Occurrences of `keyword` in `text` as a whole word, case-insensitive ("the" is not in "there")."""
    return len(re.findall(rf"(?<!\w){re.escape(keyword)}(?!\w)", text, flags=re.IGNORECASE))


@register("keyword")
def keyword_reward(
    prompts: list[str], completions: list[str], keyword: str, mode: str = "count", target: int = 4, **_
) -> list[float]:
    """Keyword reward in [0, 1]: a toy objective with a known optimum, to check that an RL loop learns at
    all. Like the positive-sentiment rewards used to smoke-test RLHF code, it is cheap to verify and
    a tiny model can raise it within a few dozen steps, unlike medical accuracy.

    mode "any": 1.0 if `keyword` occurs in the completion; "count": min(occurrences / target, 1).
    """
    if not isinstance(keyword, str) or not keyword.strip():
        raise ConfigError(f"reward.options.keyword.keyword={keyword!r} must be a non-empty string")
    check_choice("reward.options.keyword.mode", mode, MODES)
    check_range("reward.options.keyword.target", target, 1)
    if mode == "any":
        return [float(count_keyword(c, keyword) > 0) for c in completions]
    return [min(count_keyword(c, keyword) / target, 1.0) for c in completions]
