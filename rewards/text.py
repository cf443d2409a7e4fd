"""Text helpers shared by the reward functions: answer extraction, SQuAD normalisation, token F1."""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def extract_answer(completion: str) -> str:
    """The final answer: the text after the last `</think>`, else the whole completion; stripped.

    A truncated completion (an open `<think>` that never closes) is returned whole, so an answer
    written inside unfinished reasoning can still earn partial credit from F1-style rewards.
    """
    _, sep, tail = completion.rpartition(THINK_CLOSE)
    return (tail if sep else completion).strip()


def _is_punct(ch: str) -> bool:
    # SQuAD removes `string.punctuation`; Unicode punctuation (curly quotes, en dashes) goes too,
    # because medical free text from LLMs is full of it.
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lowercase, drop punctuation, drop a/an/the, collapse spaces.

    Punctuation is deleted, not replaced by a space (as in SQuAD): "beta-blocker" -> "betablocker".
    """
    text = text.lower()
    text = "".join(ch for ch in text if not _is_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(pred: str, gold: str) -> float:
    """SQuAD token F1 in [0, 1] between two texts (both normalised here; bag-of-words overlap).

    When either side normalises to nothing, the score is 1.0 only if both do (SQuAD v2's rule).
    """
    pred_tokens = normalize(pred).split()
    gold_tokens = normalize(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)
