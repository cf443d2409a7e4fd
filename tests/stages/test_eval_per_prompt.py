"""algo=eval with k samples per held-out prompt: pass@k and maj@k logged, one line per prompt written."""

from __future__ import annotations

import json

import pytest

from rewards import CombinedReward
from stages.eval import PER_PROMPT_FILE, EvalConfig, run_eval
from tests.conftest import stage_context


class RecordingLogger:
    """Keeps what the stage logs; any other logger call is a no-op."""

    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log(self, metrics: dict, step: int) -> None:
        self.logged.append(metrics)

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def test_eval_writes_per_prompt_results_for_paired_comparisons(tiny_model, tokenizer, tmp_path):
    options = {"A": "aspirin", "B": "heparin"}
    rows = [
        {
            "id": str(i),
            "question": f"Q{i}? A or B",
            "answer": "A",
            "reference": "aspirin",
            "cot": "",
            "options": options,
            "kind": "mcq",
            "prompt": tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Q{i}? A or B"}], tokenize=False, add_generation_prompt=True
            ),
        }
        for i in range(3)
    ]
    ctx = stage_context(
        tiny_model,
        tokenizer,
        EvalConfig(max_new_tokens=4, eval_samples=2, num_answers=0, fixed_questions=[], questions=[]),
        CombinedReward({"format": 1.0, "accuracy": 1.0}),
        train_rows=rows[:1],
        eval_rows=rows,
    )
    ctx.run_dir, ctx.logger = tmp_path, RecordingLogger()
    metrics = run_eval(ctx)
    assert {"eval/pass@1", "eval/pass@2", "eval/maj@2", "eval/format_rate", "eval/accuracy"} <= set(metrics)
    records = [json.loads(line) for line in (tmp_path / PER_PROMPT_FILE).read_text().splitlines()]
    assert [r["id"] for r in records] == ["0", "1", "2"] and all(r["samples"] == 2 for r in records)
    assert metrics["eval/pass@1"] == pytest.approx(sum(r["pass@1"] for r in records) / 3)
    assert metrics["eval/maj@2"] == pytest.approx(sum(r["majority_correct"] for r in records) / 3)
