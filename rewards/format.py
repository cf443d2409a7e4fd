"""Format rewards: does the completion reason inside `<think>...</think>` and then answer?"""

from __future__ import annotations

from conf.checks import check_range
from rewards.reasoning import dominant_script, is_reasoned_format, split_think, with_prefill
from rewards.registry import register
from rewards.text import THINK_CLOSE, THINK_OPEN

__all__ = [
    "format_reward",
    "format_soft_reward",
    "format_strict_reward",
    "is_think_format",
    "think_closed_reward",
    "with_prefill",
]


def is_think_format(text: str) -> bool:
    """True for `<think>` non-empty reasoning `</think>` non-empty answer, with exactly one block.

    Leading/trailing whitespace is ignored; nothing may precede `<think>`. Empty reasoning is
    rejected because `<think></think>answer` is the cheapest way to collect this reward without
    reasoning at all (`format_strict` closes the cheaper ways still open here).
    """
    parts = split_think(text)
    return parts is not None and bool(parts[0].strip()) and bool(parts[1].strip())


@register("format")
def format_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """DeepSeek-R1's format reward (DeepSeek-AI 2025, sec. 2.2.2): 1.0 if the completion is
    `<think>` reasoning `</think>` answer (see `is_think_format`), else 0.0.

    R1 (and open-r1's regex) also wrap the answer in `<answer>` tags; this project keeps the
    R1-Distill convention of a bare answer after `</think>`.
    """
    return [float(is_think_format(with_prefill(p, c))) for p, c in zip(prompts, completions, strict=True)]


@register("format_soft")
def format_soft_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """Reward *shaping* toward the R1 format, for small models that never emit the tags unprompted
    (the strict `format` reward is then 0 for every sample and gives GRPO no signal).

    0.25 each, in [0, 1]: contains `<think>` (or the prompt prefilled it); contains `</think>`; the
    first `<think>` comes before the first `</think>`; a non-empty answer follows the last
    `</think>`. Shaping changes the optimum only on malformed outputs; drop it (weight 0) once the
    policy formats reliably, as R1-Distill models already do.
    """
    scores = []
    for prompt, completion in zip(prompts, completions, strict=True):
        text = with_prefill(prompt, completion)
        opened, closed = text.find(THINK_OPEN), text.find(THINK_CLOSE)
        answer = text.rpartition(THINK_CLOSE)[2] if closed >= 0 else ""
        credit = (opened >= 0) + (closed >= 0) + (0 <= opened < closed) + bool(answer.strip())
        scores.append(0.25 * credit)
    return scores


def _reasoned_scores(
    name: str,
    prompts: list[str],
    completions: list[str],
    question: list[str] | None,
    min_words: int,
    min_script_share: float,
    min_distinct: float,
    require_answer: bool,
) -> list[float]:
    check_range(f"reward.options.{name}.min_words", min_words, 1)
    check_range(f"reward.options.{name}.min_script_share", min_script_share, 0.0, 1.0)
    check_range(f"reward.options.{name}.min_distinct", min_distinct, 0.0, 1.0)
    sources = question if question else prompts
    return [
        float(
            is_reasoned_format(
                with_prefill(p, c), min_words, min_script_share, dominant_script(q), min_distinct, require_answer
            )
        )
        for p, c, q in zip(prompts, completions, sources, strict=True)
    ]


@register("format_strict")
def format_strict_reward(
    prompts: list[str],
    completions: list[str],
    question: list[str] | None = None,
    min_words: int = 15,
    min_script_share: float = 0.9,
    min_distinct: float = 0.3,
    **_,
) -> list[float]:
    """The R1 format that cannot be had without reasoning: 1.0 when `rewards.reasoning.is_reasoned_format`
    holds for the completion (prefill applied), else 0.0.

    The plain `format` reward is satisfied by tag debris: a policy trained on it learned to open with
    `" </think</think>"` and babble, a "reasoning" of 0-1 words. This one asks for one block of at least
    `min_words` words, no tag fragments in it or in the answer, `min_distinct` of the words distinct, and
    `min_script_share` of them in the script of the question (of the prompt when the rows have none).
    """
    args = (prompts, completions, question, min_words, min_script_share, min_distinct)
    return _reasoned_scores("format_strict", *args, require_answer=True)


@register("think_closed")
def think_closed_reward(
    prompts: list[str],
    completions: list[str],
    question: list[str] | None = None,
    min_words: int = 15,
    min_script_share: float = 0.9,
    min_distinct: float = 0.3,
    **_,
) -> list[float]:
    """Shaping toward `format_strict` that the tag hack cannot collect: 1.0 when the think block closes on real
    reasoning (every check of `format_strict` but the answer), else 0.0. A small model that reasons and then
    stops without `</think>` never meets the strict format; this pays for the first half of it.
    """
    args = (prompts, completions, question, min_words, min_script_share, min_distinct)
    return _reasoned_scores("think_closed", *args, require_answer=False)
