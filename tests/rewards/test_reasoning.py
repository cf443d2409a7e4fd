"""The reasoned R1 format (format_strict), language consistency and the reasoning metrics, by hand."""

import pytest

from conf.schema import ConfigError
from rewards import REWARDS
from rewards.reasoning import (
    dominant_script,
    has_fragments,
    has_recheck,
    reasoning_stats,
    reasoning_text,
    words,
)

PREFILLED = "<|im_start|>user\nWhat causes scurvy?<|im_end|>\n<|im_start|>assistant\n<think>\n"
QUESTION = "What causes scurvy in a sailor who ate no fruit for months?"
REASONING = (
    "Scurvy is a disease of vitamin C deficiency. Vitamin C is needed to make collagen, so without it "
    "the gums bleed and wounds do not heal. A sailor without fruit gets no vitamin C."
)
REAL = f"{REASONING}\n</think>\nA lack of vitamin C."


def strict(completions, prompts=None, questions=None, **options):
    prompts = prompts if prompts is not None else [PREFILLED] * len(completions)
    questions = questions if questions is not None else [QUESTION] * len(completions)
    return REWARDS["format_strict"](prompts, completions, question=questions, **options)


# ---- the hacks a policy found against the plain format reward score 0 -----------------------------------


@pytest.mark.parametrize(
    "completion",
    [
        " </think</think> The the patient has a a big bad case of the sickness, so so so give medicine now please.",
        " </think</think>",
        "Scurvy.\n</think>\nVitamin C.",  # a one-word block
        "</think>\nVitamin C deficiency.",  # an empty block
        f"{REASONING}</think>",  # no answer
        f"{REASONING}\n</think>\n<|im_end|> vitamin",  # template debris in the answer
        f"{REASONING} </think <think>\n</think>\nVitamin C.",  # tag fragments inside the block
        f"{REASONING}\n</think>\nVitamin C.</think>",  # two closes
        f"{REASONING}",  # never closes (truncated)
        "word " * 30 + "</think>\nVitamin C.",  # one word repeated
        "Цинга болезнь витамина недостаток десны кровоточат раны заживают плохо матрос фрукты не ел "
        "месяцами поэтому витамин кончился Scurvy is vitamin C.</think>\nVitamin C.",  # mixed-script babble
        "维生素缺乏导致坏血病 牙龈出血 伤口不愈合 水手 没有 水果 维生素 胶原蛋白 合成 需要 维生素 "
        "所以 缺乏 会 出血 and this is the answer here.</think>\nVitamin C.",
    ],
)
def test_hacks_score_zero(completion):
    assert strict([completion]) == [0.0]
    assert REWARDS["format"]([PREFILLED], [" </think</think> babble"]) == [1.0]  # what the plain one paid for


def test_real_formatted_answers_score_one():
    assert strict([REAL]) == [1.0]
    assert strict(["<think>" + REAL], prompts=["no prefill"]) == [1.0]  # the completion opens the block itself
    assert strict([REAL], prompts=["no prefill"]) == [0.0]  # nothing opened it
    russian_q = "Что вызывает цингу у моряка?"
    russian = (
        "Цинга возникает при недостатке витамина C. Без него не образуется коллаген, поэтому десны "
        "кровоточат и раны плохо заживают.\n</think>\nНедостаток витамина C."
    )
    assert strict([russian], questions=[russian_q]) == [1.0]  # the question's own script counts
    assert strict([russian]) == [0.0]  # against an English question it is language mixing


def test_strict_options():
    short = "Vitamin C makes collagen; without it gums bleed.\n</think>\nVitamin C."  # 8 words
    assert strict([short]) == [0.0]
    assert strict([short], min_words=8) == [1.0]
    with pytest.raises(ConfigError, match="min_words"):
        strict([short], min_words=0)
    with pytest.raises(ConfigError, match="min_script_share"):
        strict([short], min_script_share=1.5)


def test_text_pieces():
    assert words("<think>a1b c_d</think> e") == ["a", "b", "c", "d", "e"]
    assert words(" </think</think> Hi <|im_end|>") == ["Hi", "im", "end"]
    assert has_fragments(" </think") and has_fragments("think>") and has_fragments("<|im_end|>")
    assert not has_fragments("I think the answer is C.")
    assert reasoning_text("<think>abc</think>def") == "abc"
    assert reasoning_text("<think>open ended") == "open ended"
    assert reasoning_text("no block</think>x") == ""
    assert dominant_script("Привет мир hello") == "cyrillic" and dominant_script("123") == "latin"
    assert has_recheck("Wait, that is wrong.") and has_recheck("Let me re-check the dose")
    assert has_recheck("let me double-check") and not has_recheck("the waiting room")


def test_language_consistency():
    fn = REWARDS["language_consistency"]
    mixed = "Vitamin C недостаток causes scurvy</think>C"  # 5 words, 4 Latin
    scores = fn([PREFILLED] * 3, [REAL, mixed, "no"], question=[QUESTION] * 3)
    assert scores == pytest.approx([1.0, 0.8, 1.0])
    assert fn(["no prefill"], ["plain answer"], question=[QUESTION]) == [0.0]  # no think block at all
    assert fn([PREFILLED], ["</think>answer"], question=[QUESTION]) == [0.0]  # an empty block


def test_reasoning_stats():
    prompts = [PREFILLED, PREFILLED, "plain"]
    completions = [REAL, "Wait, one two three</think>x", "no block here"]
    stats = reasoning_stats(prompts, completions)
    assert stats["think_words_median"] == 4.0  # 35, 4, 0 words
    assert stats["recheck_frac"] == pytest.approx(1 / 3)
    assert reasoning_stats([], []) == {}


def test_think_closed_pays_the_reasoned_block_without_the_answer_and_no_hack():
    think_closed = REWARDS["think_closed"]
    completions = [
        REAL,  # the full format
        f"{REASONING}</think>",  # closed on reasoning, no answer yet: the half the shaping pays for
        f"{REASONING}",  # never closes
        " </think</think> The the patient has a a big bad case of the sickness, so so so give medicine now please.",
        "Scurvy.\n</think>\n",  # a one-word block
        f"{REASONING}\n</think>\n<|im_end|>",  # debris after the close
    ]
    scores = think_closed([PREFILLED] * 6, completions, question=[QUESTION] * 6)
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert strict(completions) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
