"""Rejection sampling (algo=rejection_sampling): new SFT data from a policy's best answers (the R1 recipe's
third stage).

For each training prompt, k samples are scored with the configured rewards; the best one is kept
when it is in the R1 format (an SFT row needs a chain of thought and an answer) and its total reward
exceeds `algo.threshold`. Kept samples are written as medical_o1-style rows (`Question`,
`Complex_CoT`, `Response`, plus the ground truth), so that

    python run.py algo=sft data=medical_o1 data.source=local data.local_path=<run dir>/sft_rows.jsonl

trains on them. `algo.source_rows` rows of the original data can be mixed in, as R1 mixes non-RL
SFT data with the rejection-sampled rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from algorithms.rollout import generate_rollout
from conf.checks import check_range
from conf.options import option
from conf.registry import register_stage
from rewards.format import is_think_format, with_prefill
from rewards.text import THINK_CLOSE, THINK_OPEN
from training.loop import StageContext


@dataclass
class RejectionSamplingConfig:
    name: str = option("rejection_sampling", "the stage's name (algo=<name>)")
    samples_per_prompt: int = option(4, "k completions per prompt")
    num_prompts: int | None = option(None, "training prompts sampled (the first N; null = all)")
    batch_size: int = option(4, "prompts per generation batch")
    max_new_tokens: int = option(160, "completion budget, in tokens")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling (1.0 = off)")
    threshold: float = option(
        0.0, "a prompt's best sample is kept only if its total reward exceeds this (and it is in the think format)"
    )
    # as R1 mixes non-RL SFT data with the rejection-sampled rows
    source_rows: int = option(
        0, "rows of the original data (their reference CoT and response) appended to the output; 0 = none"
    )
    output: str = option(
        "sft_rows.jsonl", "file name of the kept rows in the run dir (a pipeline stage's data_from trains on it)"
    )

    def __post_init__(self) -> None:
        for key in ("samples_per_prompt", "batch_size", "max_new_tokens"):
            check_range(f"algo.{key}", getattr(self, key), 1)
        if self.num_prompts is not None:
            check_range("algo.num_prompts", self.num_prompts, 1)
        check_range("algo.source_rows", self.source_rows, 0)
        check_range("algo.temperature", self.temperature, 1e-3)
        check_range("algo.top_p", self.top_p, 1e-3, 1.0)


def split_think(prompt: str, completion: str) -> tuple[str, str] | None:
    """(chain of thought, answer) of a completion in the R1 format, else None."""
    text = with_prefill(prompt, completion)
    if not is_think_format(text):
        return None
    reasoning, _, answer = text.strip()[len(THINK_OPEN) :].partition(THINK_CLOSE)
    return reasoning.strip(), answer.strip()


def best_of_group(totals: torch.Tensor, group_size: int) -> list[int]:
    """Index (into the N = P * G samples, group-contiguous) of the highest total reward of each group;
    the first one on ties."""
    return [int(g * group_size + torch.argmax(group)) for g, group in enumerate(totals.view(-1, group_size))]


def sft_row(row: dict, cot: str, response: str, reward: float | None, source: str) -> dict:
    """A row that data=medical_o1 (kind=sft) reads, with the ground truth kept for verifiable rewards."""
    out = {
        "Question": row["question"],
        "Complex_CoT": cot,
        "Response": response,
        "Open-ended Verifiable Question": row["question"],
        "Ground-True Answer": row["answer"],
        "source": source,
    }
    if reward is not None:
        out["reward"] = reward
    return out


def select(
    prompts: list[str],
    completions: list[str],
    rows: list[dict],
    totals: torch.Tensor,
    group_size: int,
    threshold: float,
) -> tuple[list[dict], dict[str, int]]:
    """The kept SFT rows of one scored batch and why the other prompts were rejected (counts)."""
    kept, rejected = [], {"below_threshold": 0, "not_think_format": 0}
    for first in range(0, len(completions), group_size):
        # the best well-formed sample: a higher-scoring malformed one cannot become an SFT row
        formed = [i for i in range(first, first + group_size) if split_think(prompts[i], completions[i]) is not None]
        if not formed:
            rejected["not_think_format"] += 1
            continue
        pick = max(formed, key=lambda i: (float(totals[i]), -i))
        if float(totals[pick]) <= threshold:
            rejected["below_threshold"] += 1
            continue
        split = split_think(prompts[pick], completions[pick])
        assert split is not None  # `pick` is one of the well-formed samples
        cot, response = split
        kept.append(sft_row(rows[pick], cot, response, float(totals[pick]), "rejection_sampling"))
    return kept, rejected


@register_stage(
    "rejection_sampling", RejectionSamplingConfig, kind="pass", uses_rewards=True, objective="rs/acceptance_rate"
)
def rejection_sample(ctx: StageContext) -> dict[str, float]:
    """The algo=rejection_sampling stage: writes <run_dir>/<algo.output>; returns the acceptance rate and
    reward statistics."""
    cfg, policy, tokenizer, train_rows, reward_fn = ctx.cfg, ctx.policy, ctx.tokenizer, ctx.train_rows, ctx.reward_fn
    logger, run_dir, generator = ctx.logger, ctx.run_dir, ctx.generator
    assert policy is not None  # a stage that samples gets the policy (run.py)
    algo = cfg.algo
    prompts_rows = train_rows[: algo.num_prompts] if algo.num_prompts else train_rows
    kept: list[dict] = []
    rejected = {"below_threshold": 0, "not_think_format": 0}
    best_totals, all_totals = [], []
    generated = 0.0  # tokens sampled, for the run's summary
    for start in tqdm(range(0, len(prompts_rows), algo.batch_size), desc="rejection sampling", dynamic_ncols=True):
        rows = prompts_rows[start : start + algo.batch_size]
        rollout = generate_rollout(
            policy,
            tokenizer,
            rows,
            algo.samples_per_prompt,
            algo.max_new_tokens,
            algo.temperature,
            algo.top_p,
            generator,
        )
        scored = reward_fn(rollout.prompts, rollout.completions, rollout.rows)
        generated += float(rollout.completion_lengths.sum())
        batch_kept, batch_rejected = select(
            rollout.prompts, rollout.completions, rollout.rows, scored.total, algo.samples_per_prompt, algo.threshold
        )
        kept += batch_kept
        for reason, n in batch_rejected.items():
            rejected[reason] += n
        all_totals.append(scored.total)
        best_totals += [float(scored.total[i]) for i in best_of_group(scored.total, algo.samples_per_prompt)]
    # original rows with their reference CoT and response, those whose prompts were not sampled first
    extra_pool = [r for r in train_rows[len(prompts_rows) :] + prompts_rows if r["cot"] and r["reference"]]
    extra = [sft_row(r, r["cot"], r["reference"], None, "data") for r in extra_pool[: algo.source_rows]]
    path = Path(run_dir) / algo.output
    with open(path, "w") as f:
        for row in kept + extra:
            f.write(json.dumps(row) + "\n")
    totals = torch.cat(all_totals)
    metrics = {
        "rs/acceptance_rate": len(kept) / len(prompts_rows),
        "rs/prompts": float(len(prompts_rows)),
        "rs/accepted": float(len(kept)),
        "rs/rejected_below_threshold": float(rejected["below_threshold"]),
        "rs/rejected_not_think_format": float(rejected["not_think_format"]),
        "rs/source_rows": float(len(extra)),
        "rs/reward_mean": float(totals.mean()),
        "rs/best_reward_mean": sum(best_totals) / len(best_totals),
        "rs/accepted_reward_mean": sum(r["reward"] for r in kept) / len(kept) if kept else 0.0,
        "tokens/generated": generated,
    }
    logger.log(metrics, step=0)
    print(
        f"rejection sampling: kept {len(kept)} of {len(prompts_rows)} prompts "
        f"(acceptance {metrics['rs/acceptance_rate']:.2f}) + {len(extra)} data rows -> {path}"
    )
    if not kept and not extra:
        print("warning: no row passed; an SFT stage on this file will have no data")
    return metrics
