"""Held-out evaluation of a policy: k seeded samples per row, scored by the run's rewards (the RL
algorithms' in-training eval and the eval stage share it), with pass@1, pass@k, maj@k and the format rate."""

from __future__ import annotations

from collections import Counter

import torch
from tqdm.auto import tqdm

from algorithms.common import rollout_metrics
from algorithms.rollout import Rollout, generate_rollout
from rewards.accuracy import extract_choice, gold_choice
from rewards.combine import RewardOutput
from rewards.format import is_think_format, with_prefill
from rewards.reasoning import reasoning_stats
from rewards.text import extract_answer

PASS_PART = "accuracy"  # the reward part that decides whether a sample passes (pass@k)
STRICT_PART = "format_strict"  # the reasoned R1 format (rewards.format): its rate and pass@k when a component


def combine_batches(key: str, batches: list[tuple[int, dict[str, float]]], total: int) -> float:
    """One metric over all eval batches: extremes of extremes, sums of counts, weighted means of means."""
    values = [metrics[key] for _, metrics in batches]
    if key.endswith("_max"):
        return max(values)
    if key.endswith("_min"):
        return min(values)
    if key.endswith(("_failures", "_timeouts")) or key == "tokens/generated":
        return sum(values)
    return sum(n * metrics[key] for n, metrics in batches) / total


def format_rate(prompts: list[str], completions: list[str]) -> float:
    """Share of completions in the R1 format (`<think>` reasoning `</think>` answer), prefill counted."""
    if not completions:
        return 0.0
    formatted = [is_think_format(with_prefill(p, c)) for p, c in zip(prompts, completions, strict=True)]
    return sum(formatted) / len(formatted)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s unbiased pass@k from n samples of which c pass: 1 - C(n - c, k) / C(n, k),
    as their numerically stable product. With n = k it is 1 when any sample passes."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def majority_choice(completions: list[str], options: dict | None) -> str | None:
    """The letter most samples commit to (extract_choice on the answer after `</think>`); a tie goes to the
    letter named first; None when no sample names one."""
    letters = [extract_choice(extract_answer(c), options) for c in completions]
    counts = Counter(letter for letter in letters if letter is not None)
    return counts.most_common(1)[0][0] if counts else None


def prompt_results(batches: list[tuple[Rollout, RewardOutput]], k: int, pass_threshold: float = 1.0) -> list[dict]:
    """One record per held-out prompt from its k group-contiguous samples: mean reward, format rate, and
    when the rewards have an accuracy part, how many passed (part >= pass_threshold), pass@1 (their share)
    and pass@k; for multiple-choice rows the majority letter and whether it is the gold one."""
    records = []
    for rollout, scored in batches:
        passed = scored.parts[PASS_PART] >= pass_threshold if PASS_PART in scored.parts else None  # [N]
        strict = scored.parts[STRICT_PART] >= 1.0 if STRICT_PART in scored.parts else None  # [N]
        for start in range(0, len(rollout.completions), k):
            group = slice(start, start + k)
            row, prompts, completions = rollout.rows[start], rollout.prompts[group], rollout.completions[group]
            record = {
                "id": row.get("id"),
                "question": row.get("question"),
                "answer": row.get("answer"),
                "samples": k,
                "reward_mean": float(scored.total[group].mean()),
                "format_rate": format_rate(prompts, completions),
            }
            if passed is not None:
                c = int(passed[group].sum())
                record.update({"passed": c, "pass@1": c / k, f"pass@{k}": pass_at_k(k, c, k)})
            if strict is not None:  # the reasoned format (rewards.format_strict): share, and any of the k
                c = int(strict[group].sum())
                record.update({"format_strict_rate": c / k, f"format_strict_pass@{k}": pass_at_k(k, c, k)})
            if row.get("kind") == "mcq":
                majority = majority_choice(completions, row.get("options"))
                record.update(
                    {
                        "majority": majority,
                        "majority_correct": majority is not None
                        and majority == gold_choice(row.get("answer"), row.get("options")),
                    }
                )
            records.append(record)
    return records


def pass_metrics(records: list[dict], k: int) -> dict[str, float]:
    """Means over prompts of `prompt_results`: format_rate; pass@1 (and pass@k, k > 1) when the rewards
    have an accuracy part; format_strict_rate (and format_strict_pass@k, k > 1) when they have a format_strict
    part; maj@k over the multiple-choice prompts (k > 1)."""
    if not records:
        return {}
    out = {"format_rate": sum(r["format_rate"] for r in records) / len(records)}
    scored = [r for r in records if "passed" in r]
    if scored:
        out["pass@1"] = sum(r["pass@1"] for r in scored) / len(scored)
        if k > 1:
            out[f"pass@{k}"] = sum(r[f"pass@{k}"] for r in scored) / len(scored)
    strict = [r for r in records if "format_strict_rate" in r]
    if strict:
        out["format_strict_rate"] = sum(r["format_strict_rate"] for r in strict) / len(strict)
        if k > 1:
            key = f"format_strict_pass@{k}"
            out[key] = sum(r[key] for r in strict) / len(strict)
    mcq = [r for r in records if "majority" in r]
    if mcq and k > 1:
        out[f"maj@{k}"] = sum(r["majority_correct"] for r in mcq) / len(mcq)
    return out


def evaluate_policy(
    policy,
    tokenizer,
    rows: list[dict],
    reward_fn,
    sampling: dict,
    batch_size: int,
    seed: int,
    samples_per_prompt: int = 1,
    pass_threshold: float = 1.0,
) -> tuple[dict[str, float], list[tuple[Rollout, RewardOutput]]]:
    """k = samples_per_prompt samples per row, in batches of batch_size rows, seeded by `seed`: (metrics,
    every batch's (rollout, scores)). Metrics: the rollout metrics over all samples (means over the k),
    and `pass_metrics`. `sampling`: max_new_tokens, temperature, top_p (and optionally rollout). No rows: ({}, [])."""
    k = samples_per_prompt
    generator = torch.Generator().manual_seed(seed)
    batches: list[tuple[int, dict[str, float]]] = []  # (prompts, that batch's metrics)
    scored_batches = []
    for start in tqdm(range(0, len(rows), batch_size), desc="eval", leave=False, dynamic_ncols=True):
        batch_rows = rows[start : start + batch_size]
        rollout = generate_rollout(policy, tokenizer, batch_rows, k, generator=generator, **sampling)
        scored = reward_fn(rollout.prompts, rollout.completions, rollout.rows)
        batches.append(
            (len(batch_rows), rollout_metrics(rollout, scored.total, scored.parts, scored.failures, scored.timeouts))
        )
        scored_batches.append((rollout, scored))
    if not batches:
        return {}, []
    metrics = {key: combine_batches(key, batches, len(rows)) for key in batches[0][1] if not key.endswith("_std")}
    metrics.update(pass_metrics(prompt_results(scored_batches, k, pass_threshold), k))
    # a median is not a mean of batch medians: over every sample at once
    prompts = [p for rollout, _ in scored_batches for p in rollout.prompts]
    completions = [c for rollout, _ in scored_batches for c in rollout.completions]
    metrics.update({f"completion/{k}": v for k, v in reasoning_stats(prompts, completions).items()})
    return metrics, scored_batches
