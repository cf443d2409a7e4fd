"""Correctness rewards: the extracted answer against the ground-truth `answer` or the `reference`."""

from __future__ import annotations

import re

from conf.schema import check_choice
from rewards.registry import register
from rewards.text import extract_answer, normalize, token_f1

METRICS = ("f1", "exact", "contains")

# Letter patterns, strongest evidence first. "answer is X" takes the *last* match because models
# revise ("... so not B. The answer is D"); the weaker patterns take the first.
_ANSWER_IS = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*:?|:)\s*[*(\[]*\s*([A-E])\b")
_PAREN = re.compile(r"\(([A-E])\)")
_LINE_START = re.compile(r"^\s*[*]*([A-E])[.)]", re.MULTILINE)  # "D. operating in ..." / "D) ..."
_STANDALONE = re.compile(r"\b([A-E])\b")
_GOLD_LETTER = re.compile(r"[(\[]?([A-Ea-e])[)\].:]?")


def _contains(haystack: str, needle: str) -> bool:
    """Whole-token containment of normalised `needle` in normalised `haystack` ("ace" is not in "face")."""
    return bool(needle) and f" {needle} " in f" {haystack} "


def _option_letter(text: str, options: dict | None) -> str | None:
    """The option whose text the answer repeats: an exact normalised match, else the single option
    contained in it (none when several are)."""
    if not options:
        return None
    norm = normalize(text)
    texts = {str(k).upper(): normalize(str(v)) for k, v in options.items()}
    exact = [k for k, v in texts.items() if v and v == norm]
    if exact:
        return exact[0]
    contained = [k for k, v in texts.items() if _contains(norm, v)]
    return contained[0] if len(contained) == 1 else None


def extract_choice(text: str, options: dict | None = None) -> str | None:
    """The multiple-choice letter (A-E) an answer commits to, or None.

    Tried in order: "answer is X" / "answer: (X)"; "(X)"; "X." or "X)" at a line start; the text of
    one of `options`; the first standalone capital A-E. The last is a heuristic fallback ("Vitamin
    D" reads as D), which is why option texts are tried before it.
    """
    found = _ANSWER_IS.findall(text)
    if found:
        return found[-1]
    for pattern in (_PAREN, _LINE_START):
        match = pattern.search(text)
        if match:
            return match.group(1)
    letter = _option_letter(text, options)
    if letter:
        return letter
    match = _STANDALONE.search(text)
    return match.group(1) if match else None


def gold_choice(answer: object, options: dict | None) -> str | None:
    """The correct letter from a row's `answer`: a letter ("D", "(d)", "D.") or an option's text."""
    text = str(answer or "").strip()
    match = _GOLD_LETTER.fullmatch(text)
    if match:
        return match.group(1).upper()
    return _option_letter(text, options) if text else None


def score_open(pred: str, gold: str, metric: str) -> float:
    """Score a free-text answer against the ground truth with `metric` (f1 | exact | contains)."""
    if metric == "f1":
        return token_f1(pred, gold)
    if metric == "exact":
        return float(normalize(pred) == normalize(gold))
    return float(_contains(normalize(pred), normalize(gold)))


@register("accuracy")
def accuracy(
    prompts: list[str],
    completions: list[str],
    answer: list,
    kind: list | None = None,
    options: list | None = None,
    metric: str = "f1",
    **_,
) -> list[float]:
    """R1's rule-based accuracy reward (DeepSeek-AI 2025, sec. 2.2.2), in [0, 1].

    The answer is the text after `</think>`. Rows of kind "mcq": 1.0 when the extracted letter
    (`extract_choice`) equals the gold letter (`gold_choice`), whatever `metric` says. Other rows:
    against `answer`, by `metric` -- "f1": SQuAD token F1 (dense, partial credit for long medical
    answers that rarely match verbatim); "exact": normalised equality; "contains": the normalised
    gold appears, as whole tokens, in the normalised answer. An empty gold answer scores 0.
    """
    check_choice("reward.options.accuracy.metric", metric, METRICS)
    n = len(completions)
    kinds = kind if kind is not None else [None] * n
    choices = options if options is not None else [None] * n
    scores = []
    for completion, gold, k, opts in zip(completions, answer, kinds, choices, strict=True):
        pred = extract_answer(completion)
        if k == "mcq":
            letter = gold_choice(gold, opts)
            scores.append(float(letter is not None and extract_choice(pred, opts) == letter))
        elif gold is None or not normalize(str(gold)):
            scores.append(0.0)
        else:
            scores.append(score_open(pred, str(gold), metric))
    return scores


@register("similarity")
def similarity(prompts: list[str], completions: list[str], reference: list, **_) -> list[float]:
    """Token F1 in [0, 1] between the extracted answer and the row's reference response.

    For SFT-style data (medical-o1's `Response`) there is no short checkable answer, so overlap
    with the reference answer stands in for correctness, as in SQuAD-style evaluation of free text.
    0 when the reference is empty.
    """
    return [
        token_f1(extract_answer(c), str(r)) if r is not None and str(r).strip() else 0.0
        for c, r in zip(completions, reference, strict=True)
    ]
