"""What a completion's reasoning looks like: its think block, its words, their script, tag debris, re-checks.

Pure text functions shared by the format and language rewards (rewards.format, rewards.shaping) and by the
metrics every step and every held-out eval logs about the reasoning (algorithms.common, algorithms.evaluate).
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from functools import lru_cache

from rewards.text import THINK_CLOSE, THINK_OPEN

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
# Pieces of markup a policy learns to emit in place of reasoning: broken or repeated think tags (`</think`,
# `<think`, `think>`) and chat-template debris (`<|im_end|>` written out as text, `<|` or `|>` pieces).
_FRAGMENT = re.compile(r"<\s*/?\s*think|/?\s*think\s*>|<\||\|>", re.IGNORECASE)
# R1's "aha moment" phrases: the model stops to re-examine its own reasoning (DeepSeek-AI 2025, sec. 2.2.4)
_RECHECK = re.compile(
    r"\b(wait|let me (?:re-?)?check|re-?check|double-?check|let me verify|let me reconsider|let me re-?examine"
    r"|on second thought)\b",
    re.IGNORECASE,
)


def with_prefill(prompt: str, completion: str) -> str:
    """The completion as the model wrote it, including a `<think>` that the prompt prefilled.

    A prompt that ends with `<think>` (DeepSeek-R1-Distill's template, or `data.prefill="<think>\\n"`) starts
    the model inside the think block; it must not be penalised for not opening one. A completion that opens
    it anyway is taken as is.
    """
    if prompt.rstrip().endswith(THINK_OPEN) and not completion.lstrip().startswith(THINK_OPEN):
        return THINK_OPEN + completion
    return completion


def split_think(text: str) -> tuple[str, str] | None:
    """(reasoning, answer) of `<think>` reasoning `</think>` answer: the text starts with the one `<think>`
    and holds exactly one `</think>`; None otherwise. Leading/trailing whitespace is ignored."""
    text = text.strip()
    if not text.startswith(THINK_OPEN) or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return None
    reasoning, _, answer = text[len(THINK_OPEN) :].partition(THINK_CLOSE)
    return reasoning, answer


def reasoning_text(text: str) -> str:
    """The reasoning of a completion (prefill applied): what follows its opening `<think>` up to the first
    `</think>`, or to the end when the block never closes; "" when no block opens first."""
    text = text.strip()
    if not text.startswith(THINK_OPEN):
        return ""
    return text[len(THINK_OPEN) :].partition(THINK_CLOSE)[0]


def words(text: str) -> list[str]:
    """The letter-run words of `text` with think tags and tag fragments removed (markup is not language)."""
    return _WORD.findall(_FRAGMENT.sub(" ", _TAG.sub(" ", text)))


def has_fragments(text: str) -> bool:
    """Whether `text` holds think-tag or chat-template debris (`</think`, `<think`, `think>`, `<|`, `|>`)."""
    return _FRAGMENT.search(text) is not None


def has_recheck(text: str) -> bool:
    """Whether `text` re-examines itself ("wait", "let me check", "re-check", "double-check", ...)."""
    return _RECHECK.search(text) is not None


@lru_cache(maxsize=65536)
def _char_in_script(ch: str, script: str) -> bool:
    return unicodedata.name(ch, "").startswith(SCRIPTS[script])


def _word_in_script(word: str, script: str) -> bool:
    return all(_char_in_script(ch, script) for ch in word)


def script_fraction(text: str, script: str = "latin") -> float:
    """Fraction in [0, 1] of the words of `text` (`words`) written only in `script`; 0 if none."""
    found = words(text)
    if not found:
        return 0.0
    return sum(_word_in_script(w, script) for w in found) / len(found)


def dominant_script(text: str, default: str = "latin") -> str:
    """The script most of the words of `text` are written in (`default` when it has none)."""
    counts = {script: sum(_word_in_script(w, script) for w in words(text)) for script in SCRIPTS}
    best = max(counts, key=lambda s: counts[s])
    return best if counts[best] else default


def is_reasoned_format(
    text: str,
    min_words: int = 15,
    min_script_share: float = 0.9,
    script: str = "latin",
    min_distinct: float = 0.3,
    require_answer: bool = True,
) -> bool:
    """The R1 format with real reasoning in it (prefill already applied to `text`):
    - exactly one `<think>` reasoning `</think>` answer block (`split_think`), and a non-empty answer;
    - no tag fragments in the reasoning or the answer (`" </think</think>"` is markup, not reasoning);
    - at least `min_words` words of reasoning, at least `min_distinct` of them distinct (not one word
      repeated), and at least `min_script_share` of them in `script` (the question's: no language mixing).
    require_answer=False drops the non-empty answer (the block closing on real reasoning is enough).
    """
    parts = split_think(text)
    if parts is None:
        return False
    reasoning, answer = parts
    if has_fragments(reasoning) or has_fragments(answer) or (require_answer and not words(answer)):
        return False
    found = words(reasoning)
    if len(found) < max(min_words, 1):
        return False
    if len({w.lower() for w in found}) < min_distinct * len(found):
        return False
    return sum(_word_in_script(w, script) for w in found) >= min_script_share * len(found)


def reasoning_stats(prompts: list[str], completions: list[str]) -> dict[str, float]:
    """What a batch's reasoning looks like: median words in the think block (0 without one), share of
    completions that re-check themselves. {} for no completions."""
    if not completions:
        return {}
    texts = [with_prefill(p, c) for p, c in zip(prompts, completions, strict=True)]
    return {
        "think_words_median": float(statistics.median(len(words(reasoning_text(t))) for t in texts)),
        "recheck_frac": sum(has_recheck(c) for c in completions) / len(completions),
    }
