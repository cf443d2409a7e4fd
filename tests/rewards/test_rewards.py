"""Hand-computed cases for the text helpers and every shipped reward function."""

import pytest

from conf.schema import ConfigError
from rewards import REWARDS
from rewards.accuracy import extract_choice, gold_choice
from rewards.shaping import overlong_penalty
from rewards.text import extract_answer, normalize, token_f1

PREFILL = "<|User|>What causes scurvy?<|Assistant|><think>\n"  # R1-Distill's template opens the block


def score(name, completions, prompts=None, **kwargs):
    prompts = prompts if prompts is not None else ["q"] * len(completions)
    return REWARDS[name](prompts, completions, **kwargs)


# ---- text helpers ------------------------------------------------------------------------------


def test_extract_answer():
    assert extract_answer("<think>a</think> x </think>  y \n") == "y"  # after the *last* close
    assert extract_answer("  no tags here ") == "no tags here"
    assert extract_answer("<think>unfinished") == "<think>unfinished"


def test_normalize_is_squad_style():
    assert normalize("The  Heart-Attack, (acute)!") == "heartattack acute"
    assert normalize("An apple\tand A pear") == "apple and pear"
    assert normalize("\u201cAspirin\u201d \u2013 daily") == "aspirin daily"  # Unicode punctuation


def test_token_f1_by_hand():
    assert token_f1("The heart attack", "heart failure") == pytest.approx(0.5)  # P = R = 1/2
    assert token_f1("beta blockers and aspirin", "aspirin") == pytest.approx(0.4)  # P 1/4, R 1
    assert token_f1("x x y", "x y z") == pytest.approx(2 / 3)  # counts clipped: 2 shared of 3
    assert token_f1("Aspirin.", "aspirin") == 1.0
    assert token_f1("kidney", "liver") == 0.0
    assert token_f1("", "liver") == 0.0 and token_f1("the", "a") == 1.0  # both empty -> 1


# ---- format ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, completion, expected",
    [
        ("q", "<think>reason</think>answer", 1.0),
        ("q", "\n<think>\nreason\n</think>\n\nanswer\n", 1.0),
        (PREFILL, "reason</think>answer", 1.0),  # the template opened the block
        (PREFILL, "<think>reason</think>answer", 1.0),  # opening it again is tolerated
        ("q", "reason</think>answer", 0.0),  # no prefill: the opening tag is missing
        ("q", "<think>a</think><think>b</think>c", 0.0),  # two think blocks
        (PREFILL, "a</think><think>b</think>c", 0.0),
        ("q", "<think>reason</think>  \n", 0.0),  # empty answer
        ("q", "<think> </think>answer", 0.0),  # empty reasoning
        ("q", "Sure! <think>reason</think>answer", 0.0),  # text before the block
        ("q", "<think>reason and answer", 0.0),  # never closed
        ("q", "plain answer", 0.0),
    ],
)
def test_format(prompt, completion, expected):
    assert score("format", [completion], [prompt]) == [expected]


@pytest.mark.parametrize(
    "prompt, completion, expected",
    [
        ("q", "", 0.0),
        ("q", "plain answer", 0.0),
        ("q", "<think>a", 0.25),  # opened only
        ("q", "</think>ans", 0.5),  # closed + answer
        ("q", "</think>x<think>", 0.75),  # both tags, wrong order, answer "x<think>"
        ("q", "<think>a</think>", 0.75),  # no answer
        ("q", "<think>a</think>b", 1.0),
        (PREFILL, "a</think>b", 1.0),
    ],
)
def test_format_soft(prompt, completion, expected):
    assert score("format_soft", [completion], [prompt]) == [expected]


# ---- accuracy / similarity ---------------------------------------------------------------------


def test_accuracy_open_metrics():
    completions = [
        "<think>hmm</think>Acute heart failure",
        "<think>x</think>The Heart failure.",
        "heart failures",
    ]
    answer, kind = ["heart failure"] * 3, ["open"] * 3
    # f1: [acute heart failure] vs [heart failure] -> P 2/3, R 1, F1 0.8; [heart failures]: P = R = 1/2
    assert score("accuracy", completions, answer=answer, kind=kind) == pytest.approx([0.8, 1.0, 0.5])
    assert score("accuracy", completions, answer=answer, kind=kind, metric="exact") == [0.0, 1.0, 0.0]
    # contains works on whole tokens: "failures" does not contain "failure"
    assert score("accuracy", completions, answer=answer, kind=kind, metric="contains") == [1.0, 1.0, 0.0]


def test_accuracy_empty_gold_and_default_kind():
    assert score("accuracy", ["x", "x"], answer=["", None]) == [0.0, 0.0]
    assert score("accuracy", ["<think>r</think>scurvy"], answer=["Scurvy"]) == [1.0]  # kind absent -> open


def test_accuracy_bad_metric_names_choices():
    with pytest.raises(ConfigError, match="f1, exact, contains"):
        score("accuracy", ["x"], answer=["x"], metric="bleu")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("D", "D"),
        ("The answer is D.", "D"),
        ("Answer: (B)", "B"),
        ("I ruled out A. The correct answer is **E**", "E"),  # the stated conclusion wins
        ("So not B; the answer is C. Final answer: D", "D"),  # the last statement wins
        ("(C) is correct", "C"),
        ("B. Double gloving", "B"),
        ("B) double gloving", "B"),
        ("It must be E", "E"),  # standalone letter fallback
        ("not sure", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_extract_choice_from_option_text():
    options = {"B": "Vitamin D deficiency", "D": "Iron deficiency"}
    assert extract_choice("Vitamin D deficiency.", options) == "B"  # not the standalone "D"
    assert extract_choice("It is iron deficiency", options) == "D"  # the one option contained


def test_gold_choice():
    options = {"A": "use of disposable gowns", "D": "operating\nin a theatre with negative pressure"}
    assert [gold_choice(a, None) for a in ("D", "(d)", "D.", "", None)] == ["D", "D", "D", None, None]
    assert gold_choice("operating in a theatre with negative pressure", options) == "D"


def test_accuracy_mcq_letter_match():
    options = {"A": "scurvy", "B": "rickets", "C": "beriberi"}
    completions = [
        "<think>maybe (A)?</think>The answer is B",  # letters inside the reasoning are ignored
        "<think>r</think>The answer is B",
        "<think>r</think>Rickets",  # the option text counts as its letter
        "<think>r</think>The answer is B",
    ]
    rows = dict(answer=["B", "C", "B", "rickets"], kind=["mcq"] * 4, options=[options] * 4)
    # metric does not apply to mcq rows
    assert score("accuracy", completions, metric="f1", **rows) == [1.0, 0.0, 1.0, 1.0]


def test_similarity():
    # [aspirin and rest] vs [give aspirin]: P 1/3, R 1/2 -> F1 = 2 * (1/6) / (5/6) = 0.4
    completions = ["<think>x</think>aspirin and rest"] * 3
    references = ["Give aspirin.", "", None]
    assert score("similarity", completions, reference=references) == pytest.approx([0.4, 0, 0])


# ---- language ----------------------------------------------------------------------------------


def test_language_latin():
    completions = [
        "Hello world",
        "Hello мир",
        "café naïve",  # accented Latin letters are Latin
        "<think>привет</think> yes",  # the tags are not words
        "",
        "123 !!",
        "Hi 你好 there",
    ]
    assert score("language", completions) == pytest.approx([1.0, 0.5, 1.0, 0.5, 0.0, 0.0, 2 / 3])


def test_language_other_scripts_and_validation():
    assert score("language", ["Hello мир", "мир2мир"], script="cyrillic") == [0.5, 1.0]
    assert score("language", ["Hi 你好 there"], script="cjk") == pytest.approx([1 / 3])
    with pytest.raises(ConfigError, match="latin"):
        score("language", ["x"], script="klingon")


# ---- length ------------------------------------------------------------------------------------


def test_length_dapo_boundaries():
    # max 100 tokens, buffer 20 -> soft limit 80 tokens; 4 characters per token
    chars = [0, 320, 360, 400, 404]  # tokens: 0, 80, 90, 100, 101
    completions = ["x" * c for c in chars]
    assert score("length", completions, max_tokens=100, buffer=20) == pytest.approx([0, 0, -0.5, -1, -1])


def test_length_zero_buffer_is_a_step_and_validation():
    assert score("length", ["x" * 400, "x" * 404], max_tokens=100, buffer=0) == [0.0, -1.0]
    assert overlong_penalty(85, 100, 20) == pytest.approx(-0.25)
    with pytest.raises(ConfigError, match="buffer"):
        score("length", ["x"], max_tokens=10, buffer=20)


# ---- keyword -----------------------------------------------------------------------------------


def test_keyword_count_and_any():
    completions = ["The cat and the hat. THE end. There", "nothing here", "the the the the the"]
    # whole words, case-insensitive: 3 in the first ("There" does not count)
    assert score("keyword", completions, keyword="the") == [0.75, 0.0, 1.0]
    assert score("keyword", completions, keyword="the", target=2) == [1.0, 0.0, 1.0]
    assert score("keyword", completions, keyword="the", mode="any") == [1.0, 0.0, 1.0]


def test_keyword_validation():
    with pytest.raises(ConfigError, match="count, any"):
        score("keyword", ["x"], keyword="the", mode="all")
    with pytest.raises(ConfigError, match="non-empty"):
        score("keyword", ["x"], keyword=" ")
