"""Free-text questions of the user's choosing (the eval stage's `algo.questions`): answered by the model under
test and, beside it, by `algo.before_path`'s model, in answers.md and the wandb answers table. No dataset row
is needed, so a question the shipped sample lacks (the R1 medical fine-tune's showcase question) is asked as
it is. There is no ground truth to score against: the answers are for reading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.rollout import generate_rollout
from conf.schema import DataConfig
from data.loading import render_prompt

# the question the R1 medical fine-tune is shown off with (it is in the full medical-o1 data, not the sample)
SHOWCASE_QUESTION = (
    "A 61-year-old woman with a long history of involuntary urine loss during activities like coughing or "
    "sneezing but no leakage at night undergoes a gynecological exam and Q-tip test. Based on these findings, "
    "what would cystometry most likely reveal about her residual volume and detrusor contractions?"
)


@dataclass
class FreeAnswers:
    questions: list[str]
    after: list[str]  # the model under test
    before: list[str] | None  # algo.before_path's model; None without one


def answer_free_questions(
    policy, before_model, tokenizer, questions: list[str], data: DataConfig, sampling: dict, seed: int
) -> FreeAnswers:
    """One seeded sample per question from `policy` and (when not None) `before_model`, each from the same
    seed, with the data's chat template and system prompt. `sampling`: max_new_tokens, temperature, top_p."""
    rows = [
        {"prompt": render_prompt(tokenizer, q, data.system_prompt, data.prefill, data.demonstrations), "question": q}
        for q in questions
    ]

    def answers(model) -> list[str]:
        if not rows:
            return []
        generator = torch.Generator().manual_seed(seed)
        return generate_rollout(model, tokenizer, rows, 1, generator=generator, **sampling).completions

    return FreeAnswers(list(questions), answers(policy), None if before_model is None else answers(before_model))


def table_cell(text: str) -> str:
    """Text as one markdown table cell: pipes escaped, line breaks as <br>."""
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def models_line(after_name: str, before_name: str | None) -> str:
    """Which model answered (and, with a before model, which answered first)."""
    return f"Model: `{after_name}`." if before_name is None else f"Before: `{before_name}`; after: `{after_name}`."


def answer_table(after: str, before: str | None) -> list[str]:
    """One question's answer as a markdown table, or its before and after answers side by side."""
    if before is None:
        return ["| answer |", "|---|", f"| {table_cell(after)} |", ""]
    return ["| before | after |", "|---|---|", f"| {table_cell(before)} | {table_cell(after)} |", ""]


def free_questions_markdown(free: FreeAnswers, after_name: str, before_name: str | None) -> str:
    """The section of answers.md with the free-text questions, before and after side by side."""
    if not free.questions:
        return ""
    lines = ["", "# Your questions", "", models_line(after_name, None if free.before is None else before_name), ""]
    for i, question in enumerate(free.questions):
        lines += [
            f"## Q{i + 1}. {question.strip()}",
            "",
            *answer_table(free.after[i], None if free.before is None else free.before[i]),
        ]
    return "\n".join(lines)


ANSWER_COLUMNS = ["question", "ground_truth", "before", "after", "reward_before", "reward_after"]


def answers_table(
    rows: list[dict],
    after: list[str],
    after_scores: list[dict],
    before: list[str] | None,
    before_scores: list[dict] | None,
    free: FreeAnswers,
) -> tuple[list[str], list[list]]:
    """(columns, rows) of the eval answers table: the held-out questions with their ground truth and total
    rewards, then the free-text questions (no ground truth, no reward)."""
    table = []
    for i, row in enumerate(rows):
        table.append(
            [
                row["question"],
                row["answer"],
                before[i] if before else None,
                after[i],
                before_scores[i]["total"] if before_scores else None,
                after_scores[i]["total"],
            ]
        )
    for i, question in enumerate(free.questions):
        table.append([question, None, free.before[i] if free.before else None, free.after[i], None, None])
    return ANSWER_COLUMNS, table
