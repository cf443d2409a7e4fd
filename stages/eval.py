"""Held-out evaluation (algo=eval): reward per component, accuracy, format rate, length, and answers.

One seeded sample per held-out prompt from the model under test (`model`, e.g. `model.source=local
model.path=<run>/checkpoints/final`) is scored with the configured rewards; besides every reward
component the stage reports the R1 format rate and the accuracy against the ground-truth answer on
their own (whatever the reward weights are). A few fixed questions are answered by the model and,
when `algo.before_path` names another model, by that one too, side by side in `answers.md`; so are the
free-text questions of `algo.questions` (stages/questions.py), which need no dataset row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from algorithms.evaluate import evaluate_policy, prompt_results
from algorithms.policy_gradient import EVAL_SEED_OFFSET
from conf.checks import check_choice, check_range
from conf.options import option
from conf.registry import register_stage
from conf.schema import ModelConfig
from models.loading import load_causal_lm
from rewards.accuracy import accuracy
from stages.questions import (
    SHOWCASE_QUESTION,
    answer_free_questions,
    answer_table,
    answers_table,
    free_questions_markdown,
    models_line,
)
from training.loop import StageContext
from training.tracking import sample_records


@dataclass
class EvalConfig:
    name: str = option("eval", "the stage's name (algo=<name>)")
    max_new_tokens: int = option(160, "completion budget, in tokens")
    temperature: float = option(0.7, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling (1.0 = off)")
    accuracy_metric: str = option("f1", "f1 | exact | contains: the extracted answer against the ground truth")
    before_path: str | None = option(
        None, 'a model directory (or "embedded") whose answers go beside the model\'s in answers.md (null: none)'
    )
    num_answers: int = option(3, "held-out questions whose answers are written to answers.md")
    fixed_questions: list[str] = option(
        factory=lambda: ["61-year-old woman", "cystometry"],
        help="questions (case-insensitive substrings) always written to answers.md when some row contains them",
    )
    eval_samples: int = option(1, "k samples per held-out prompt: pass@1 (mean over the k), pass@k, maj@k")
    pass_threshold: float = option(1.0, "a sample passes when its accuracy reward part is >= this")
    questions: list[str] = option(
        factory=lambda: [SHOWCASE_QUESTION],
        help="free-text questions answered as written (no dataset row needed), beside before_path's in answers.md",
    )

    def __post_init__(self) -> None:
        check_choice("algo.accuracy_metric", self.accuracy_metric, ("f1", "exact", "contains"))
        check_range("algo.max_new_tokens", self.max_new_tokens, 1)
        check_range("algo.temperature", self.temperature, 1e-3)
        check_range("algo.top_p", self.top_p, 1e-3, 1.0)
        check_range("algo.num_answers", self.num_answers, 0)
        check_range("algo.eval_samples", self.eval_samples, 1)


ANSWERS_FILE = "answers.md"
EVAL_FILE = "eval.json"
PER_PROMPT_FILE = "per_prompt.jsonl"  # one line per held-out prompt: paired comparisons of checkpoints


def pick_questions(eval_rows: list[dict], train_rows: list[dict], patterns: list[str], count: int) -> list[dict]:
    """Rows whose answers go to answers.md: for each pattern the first row (held-out first) whose question
    contains it (case-insensitive), then the first `count` held-out rows; each row once."""
    picked: dict[str, dict] = {}
    for pattern in patterns:
        match = next((r for r in eval_rows + train_rows if pattern.lower() in r["question"].lower()), None)
        if match is not None:
            picked.setdefault(match["id"], match)
    for row in eval_rows[:count]:
        picked.setdefault(row["id"], row)
    return list(picked.values())


def load_before_model(path: str, tokenizer, device: torch.device):
    """The comparison model: a model directory, or "embedded" for the embedded default."""
    cfg = ModelConfig() if path == "embedded" else ModelConfig(name="before", source="local", path=path)
    # transformers wraps `to` with functools.wraps(nn.Module.to), which types the bound method as unbound
    return load_causal_lm(cfg, tokenizer).to(device)  # type: ignore[arg-type]


def answers_markdown(
    rows: list[dict],
    after: list[str],
    after_scores: list[dict],
    before: list[str] | None,
    before_scores: list[dict] | None,
    after_name: str,
    before_name: str | None,
) -> str:
    """The before/after answers file: per question, the ground truth and the two answers side by side."""
    lines = ["# Answers to fixed questions", "", models_line(after_name, None if before is None else before_name), ""]
    for i, row in enumerate(rows):
        lines += [f"## {i + 1}. {row['question'].strip()}", "", f"**Ground truth:** {row['answer'].strip()}", ""]

        def scores(parts: dict) -> str:
            return ", ".join(f"{k} {v:.2f}" for k, v in parts.items())

        lines += answer_table(after[i], None if before is None else before[i])
        if before is None:
            lines += [f"Rewards: {scores(after_scores[i])}", ""]
        else:
            assert before_scores is not None  # given with `before`
            lines += [f"Rewards before: {scores(before_scores[i])}; after: {scores(after_scores[i])}", ""]
    return "\n".join(lines)


def answer_questions(
    model, tokenizer, rows: list[dict], reward_fn, sampling: dict, batch_size: int, seed: int
) -> tuple[list[str], list[dict[str, float]]]:
    """(completion, {reward part: score}) per row, one seeded sample each."""
    _, batches = evaluate_policy(model, tokenizer, rows, reward_fn, sampling, batch_size, seed)
    completions, scores = [], []
    for rollout, scored in batches:
        completions += rollout.completions
        for i in range(len(rollout.completions)):
            scores.append({"total": float(scored.total[i]), **{k: float(v[i]) for k, v in scored.parts.items()}})
    return completions, scores


@register_stage("eval", EvalConfig, kind="pass", uses_rewards=True, objective="eval/reward/total_mean")
def run_eval(ctx: StageContext) -> dict[str, float]:
    """The algo=eval stage: metrics on every held-out prompt (eval.json, metrics.jsonl), answers.md."""
    cfg, policy, tokenizer, reward_fn = ctx.cfg, ctx.policy, ctx.tokenizer, ctx.reward_fn
    logger, run_dir = ctx.logger, ctx.run_dir
    train_rows, eval_rows = ctx.train_rows, ctx.eval_rows
    algo, tcfg = cfg.algo, cfg.trainer
    assert policy is not None  # a stage that samples gets the policy (run.py)
    if not eval_rows:
        raise ValueError("algo=eval needs held-out rows: set data.eval_size to at least 1")
    sampling = {"max_new_tokens": algo.max_new_tokens, "temperature": algo.temperature, "top_p": algo.top_p}
    seed = cfg.seed + EVAL_SEED_OFFSET  # the RL algorithms' eval seed: the same prompts, the same random stream
    metrics, batches = evaluate_policy(
        policy,
        tokenizer,
        eval_rows,
        reward_fn,
        sampling,
        tcfg.eval_batch_size,
        seed,
        algo.eval_samples,
        algo.pass_threshold,
    )
    records = prompt_results(batches, algo.eval_samples, algo.pass_threshold)
    (Path(run_dir) / PER_PROMPT_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = [p for rollout, _ in batches for p in rollout.prompts]
    completions = [c for rollout, _ in batches for c in rollout.completions]
    sample_rows = [r for rollout, _ in batches for r in rollout.rows]
    correct = accuracy(
        prompts,
        completions,
        answer=[r["answer"] for r in sample_rows],
        kind=[r["kind"] for r in sample_rows],
        options=[r["options"] for r in sample_rows],
        metric=algo.accuracy_metric,
    )
    metrics["accuracy"] = sum(correct) / len(correct)
    metrics = {f"eval/{k}": v for k, v in metrics.items()}
    logger.log(metrics, step=0)
    for rollout, scored in batches:
        logger.log_samples(
            0,
            sample_records(
                rollout.prompts, rollout.completions, {"total": scored.total, **scored.parts}, len(rollout.completions)
            ),
        )

    rows = pick_questions(eval_rows, train_rows, list(algo.fixed_questions), algo.num_answers)
    after_name = cfg.model.path or cfg.model.name
    after, after_scores = answer_questions(policy, tokenizer, rows, reward_fn, sampling, tcfg.eval_batch_size, seed)
    before = before_scores = before_model = None
    if algo.before_path is not None and (rows or algo.questions):
        before_model = load_before_model(algo.before_path, tokenizer, next(policy.parameters()).device)
        if rows:
            before, before_scores = answer_questions(
                before_model, tokenizer, rows, reward_fn, sampling, tcfg.eval_batch_size, seed
            )
    free = answer_free_questions(policy, before_model, tokenizer, list(algo.questions), cfg.data, sampling, seed)
    del before_model
    text = answers_markdown(rows, after, after_scores, before, before_scores, after_name, algo.before_path)
    text += free_questions_markdown(free, after_name, algo.before_path)
    logger.log_table("eval/answers", *answers_table(rows, after, after_scores, before, before_scores, free), step=0)
    (Path(run_dir) / ANSWERS_FILE).write_text(text)
    (Path(run_dir) / EVAL_FILE).write_text(json.dumps(metrics, indent=2))
    summary = ", ".join(
        f"{k.removeprefix('eval/')} {v:.3f}"
        for k, v in metrics.items()
        if k in ("eval/reward/total_mean", "eval/format_rate", "eval/accuracy", "eval/completion/length_mean")
    )
    print(f"eval on {len(eval_rows)} held-out prompts: {summary}; answers in {Path(run_dir) / ANSWERS_FILE}")
    return metrics
