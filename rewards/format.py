"""Format rewards: does the completion reason inside `<think>...</think>` and then answer?"""

from __future__ import annotations

from rewards.registry import register
from rewards.text import THINK_CLOSE, THINK_OPEN


def with_prefill(prompt: str, completion: str) -> str:
    """The completion as the model wrote it, including a `<think>` that the chat template prefilled.

    Some templates (DeepSeek-R1-Distill's) end the prompt with `<think>\\n`, so the model starts
    inside the think block; it must not be penalised for not opening one. A completion that opens
    it anyway is taken as is.
    """
    if prompt.rstrip().endswith(THINK_OPEN) and not completion.lstrip().startswith(THINK_OPEN):
        return THINK_OPEN + completion
    return completion


def is_think_format(text: str) -> bool:
    """True for `<think>` non-empty reasoning `</think>` non-empty answer, with exactly one block.

    Leading/trailing whitespace is ignored; nothing may precede `<think>`. Empty reasoning is
    rejected because `<think></think>answer` is the cheapest way to collect this reward without
    reasoning at all.
    """
    text = text.strip()
    if not text.startswith(THINK_OPEN):
        return False
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return False
    reasoning, _, answer = text[len(THINK_OPEN) :].partition(THINK_CLOSE)
    return bool(reasoning.strip()) and bool(answer.strip())


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
