"""Shaping rewards that judge the form of the text rather than its correctness: language, length."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from conf.schema import check_choice, check_range
from rewards.registry import register

# Script -> prefixes of the Unicode character names of its letters.
SCRIPTS: dict[str, tuple[str, ...]] = {
    "latin": ("LATIN",),
    "cyrillic": ("CYRILLIC",),
    "greek": ("GREEK",),
    "arabic": ("ARABIC",),
    "hebrew": ("HEBREW",),
    "cjk": ("CJK", "HIRAGANA", "KATAKANA", "HANGUL"),
}

_WORD = re.compile(r"[^\W\d_]+")  # runs of letters: digits, underscores and punctuation split words
_TAG = re.compile(r"</?think>")


@lru_cache(maxsize=65536)
def _char_in_script(ch: str, script: str) -> bool:
    return unicodedata.name(ch, "").startswith(SCRIPTS[script])


def script_fraction(text: str, script: str = "latin") -> float:
    """Fraction in [0, 1] of the letter-run words of `text` written only in `script`; 0 if none.

    The `<think>` tags are removed first: they are markup, not language, and would otherwise give
    every formatted completion free Latin words.
    """
    words = _WORD.findall(_TAG.sub(" ", text))
    if not words:
        return 0.0
    hits = sum(all(_char_in_script(ch, script) for ch in word) for word in words)
    return hits / len(words)


@register("language")
def language(prompts: list[str], completions: list[str], script: str = "latin", **_) -> list[float]:
    """R1's language-consistency reward (DeepSeek-AI 2025, sec. 2.3.2), in [0, 1].

    R1-Zero mixed languages inside its reasoning; R1 added the proportion of target-language words
    in the chain of thought as a reward. Here a word is a run of letters and it counts as target
    language when every letter belongs to `script` (latin covers ASCII and accented letters);
    scripts: latin | cyrillic | greek | arabic | hebrew | cjk (unsegmented CJK counts runs, not
    words). An empty completion scores 0.
    """
    check_choice("reward.options.language.script", script, tuple(SCRIPTS))
    return [script_fraction(c, script) for c in completions]


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
