"""Shaping rewards that judge the form of the text rather than its correctness: language, length."""

from __future__ import annotations

from conf.schema import check_choice, check_range
from rewards.reasoning import SCRIPTS, dominant_script, reasoning_text, script_fraction, with_prefill
from rewards.registry import register


@register("language")
def language(prompts: list[str], completions: list[str], script: str = "latin", **_) -> list[float]:
    """R1's language-consistency reward (DeepSeek-AI 2025, sec. 2.3.2), in [0, 1].

    R1-Zero mixed languages inside its reasoning; R1 added the proportion of target-language words
    in the chain of thought as a reward. Here a word is a run of letters and it counts as target
    language when every letter belongs to `script` (latin covers ASCII and accented letters);
    scripts: latin | cyrillic | greek | arabic | hebrew | cjk (unsegmented CJK counts runs, not
    words). An empty completion scores 0. `language_consistency` judges the reasoning alone, in the
    question's own script.
    """
    check_choice("reward.options.language.script", script, tuple(SCRIPTS))
    return [script_fraction(c, script) for c in completions]


@register("language_consistency")
def language_consistency(
    prompts: list[str], completions: list[str], question: list[str] | None = None, **_
) -> list[float]:
    """R1's language-consistency reward as the R1 report defines it (DeepSeek-AI 2025, sec. 2.3.2): the
    proportion of the chain of thought's words in the target language, in [0, 1], where the target is the
    script most of the question's words are written in (`rewards.reasoning.dominant_script`; the prompt's
    when the rows carry no question). The chain of thought is the think block (prefill applied; to the end
    when it never closes); a completion without one scores 0, so this never pays for skipping the block.
    """
    sources = question if question else prompts
    return [
        script_fraction(reasoning_text(with_prefill(p, c)), dominant_script(q))
        for p, c, q in zip(prompts, completions, sources, strict=True)
    ]


def approx_tokens(text: str) -> float:
    """Approximate token count: characters / 4, the usual rule of thumb for English BPE vocabularies.

    Characters rather than words because medical text is full of long words that split into many
    tokens; fractional so that the penalty below is smooth.
    """
    return len(text) / 4


def overlong_penalty(n_tokens: float, max_tokens: float, buffer: float) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, sec. 3.4), in [-1, 0].

    0 up to `max_tokens - buffer`, then linear down to -1 at `max_tokens`, -1 beyond.
    """
    soft_limit = max_tokens - buffer
    if n_tokens <= soft_limit:
        return 0.0
    if n_tokens > max_tokens:
        return -1.0
    return (soft_limit - n_tokens) / buffer


@register("length")
def length(prompts: list[str], completions: list[str], max_tokens: int = 512, buffer: int = 128, **_) -> list[float]:
    """DAPO overlong reward shaping in [-1, 0]: discourages completions that approach the
    generation limit, whose truncated answers would otherwise add noise to the reward.

    `max_tokens` (tokens) should match the rollout's max_new_tokens; `buffer` (tokens) is the width
    of the linear ramp (DAPO: 20480 and 4096). Length is estimated by `approx_tokens`
    (characters / 4) of the completion alone.
    """
    check_range("reward.options.length.max_tokens", max_tokens, 1)
    check_range("reward.options.length.buffer", buffer, 0, max_tokens)
    return [overlong_penalty(approx_tokens(c), max_tokens, buffer) for c in completions]
