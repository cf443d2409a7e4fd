"""Reward-model training (algo=reward_model): Bradley-Terry on preference pairs built from data rows.

A pair opposes the row's reference response (chosen) to a worse response to the same prompt
(rejected, `algo.rejected`): the reference of another question (other_response), the reference cut
short (truncated), or a sample of the untrained policy (policy_sample). The trained model is saved
to `<run_dir>/reward_model`, which `reward=reward_model reward.path=...` scores RL samples with.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from algorithms.losses import bradley_terry_loss
from algorithms.rollout import generate_rollout
from algorithms.tracking import RunLogger
from algorithms.supervised import supervised_fit
from algorithms.update import build_optimizer
from conf.schema import Config
from data.loading import PromptSampler
from models.heads import RewardModel, encode_texts


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def clip_references(rows: list[dict], tokenizer, max_tokens: int) -> list[dict]:
    """Rows with a non-empty reference, cut to `max_tokens` tokens (before pairs are built, so that a
    truncated rejected response is still shorter than its chosen one)."""
    rows = [r for r in rows if r.get("reference")]
    ids = tokenizer([r["reference"] for r in rows], add_special_tokens=False)["input_ids"] if rows else []
    return [{**r, "reference": tokenizer.decode(t[:max_tokens]) if len(t) > max_tokens else r["reference"]}
            for r, t in zip(rows, ids)]


def build_pairs(rows: list[dict], pool: list[dict], rejected: str, rng: random.Random,
                truncate_frac: float = 0.5, samples: list[str] | None = None) -> list[PreferencePair]:
    """One pair per row: chosen = row["reference"]; rejected per `rejected`.

    other_response: the reference of a random row of `pool` with a different reference;
    truncated: the first `truncate_frac` of the reference's words (at least one word fewer);
    policy_sample: samples[i], a completion of row i's prompt.
    """
    pairs = []
    for i, row in enumerate(rows):
        chosen = row["reference"]
        if rejected == "other_response":
            other = chosen
            while other == chosen:  # the caller guarantees a second distinct reference in the pool
                other = pool[rng.randrange(len(pool))]["reference"]
        elif rejected == "truncated":
            words = chosen.split()
            other = " ".join(words[: min(int(len(words) * truncate_frac), len(words) - 1)])
        elif rejected == "policy_sample":
            other = samples[i]
        else:
            raise ValueError(f"rejected={rejected!r}; choose one of: other_response, truncated, policy_sample")
        pairs.append(PreferencePair(row["prompt"], chosen, other))
    return pairs


def pair_scores(rm: RewardModel, tokenizer, pairs: list[PreferencePair]) -> tuple[Tensor, Tensor]:
    """(r_chosen [B], r_rejected [B]) from one forward over the 2B sequences."""
    prompts = [p.prompt for p in pairs]
    batch = encode_texts(tokenizer, prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                         rm.device)
    scores = rm.score(**batch)  # [2B]
    return scores[: len(pairs)], scores[len(pairs) :]


def bt_step(rm: RewardModel, tokenizer, pairs: list[PreferencePair], optimizer: torch.optim.Optimizer,
            micro_batch_size: int, max_grad_norm: float) -> dict[str, float]:
    """One optimiser step on `pairs` (gradients accumulated over micro-batches); returns mean stats."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    stats: dict[str, float] = defaultdict(float)
    rm.train()
    for start in range(0, len(pairs), micro_batch_size):
        micro = pairs[start : start + micro_batch_size]
        share = len(micro) / len(pairs)
        loss, micro_stats = bradley_terry_loss(*pair_scores(rm, tokenizer, micro))
        (loss * share).backward()
        for key, value in {"loss": loss.detach(), **micro_stats}.items():
            stats[key] += float(value) * share
    rm.eval()
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if torch.isfinite(norm):  # a non-finite gradient skips the step, as in the RL loop
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**stats, "grad_norm": float(norm)}


@torch.inference_mode()
def evaluate_pairs(rm: RewardModel, tokenizer, pairs: list[PreferencePair], batch_size: int = 8) -> dict[str, float]:
    """Held-out pairwise accuracy, loss and margin over `pairs`."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        c, r = pair_scores(rm, tokenizer, pairs[start : start + batch_size])
        chosen.append(c)
        rejected.append(r)
    loss, stats = bradley_terry_loss(torch.cat(chosen), torch.cat(rejected))
    return {"loss": float(loss), "accuracy": float(stats["accuracy"]), "margin": float(stats["margin"])}


def train_reward_model(cfg: Config, policy, tokenizer, train_rows: list[dict], eval_rows: list[dict],
                       logger: RunLogger, run_dir: Path, generator: torch.Generator) -> dict[str, float]:
    """The algo=reward_model stage: trainer.max_steps Bradley-Terry steps, then save to run_dir/reward_model."""
    algo, tcfg = cfg.algo, cfg.trainer
    train_rows = clip_references(train_rows, tokenizer, algo.max_response_tokens)
    eval_rows = clip_references(eval_rows, tokenizer, algo.max_response_tokens)
    if not train_rows:
        raise ValueError("algo=reward_model needs rows with a reference response (data.reference_field)")
    everything = train_rows + eval_rows
    if algo.rejected == "other_response" and len({r["reference"] for r in everything}) < 2:
        raise ValueError("algo.rejected=other_response needs at least two different reference responses")

    def pool(rows: list[dict]) -> list[dict]:  # other responses come from the same split when it can
        return rows if len({r["reference"] for r in rows}) > 1 else everything

    def make_pairs(rows: list[dict], rng: random.Random) -> list[PreferencePair]:
        samples = None
        if algo.rejected == "policy_sample":  # the policy is not trained here: its samples stay "worse"
            samples = generate_rollout(policy, tokenizer, rows, 1, algo.max_new_tokens, algo.temperature,
                                       algo.top_p, generator).completions
        return build_pairs(rows, pool(rows), algo.rejected, rng, algo.truncate_frac, samples)

    # sampling needs the policy intact, so the reward model trains a copy of its backbone then
    rm = RewardModel.from_causal_lm(policy, copy_weights=algo.rejected == "policy_sample")
    optimizer = build_optimizer([p for p in rm.parameters() if p.requires_grad], tcfg)
    sampler = PromptSampler(train_rows, algo.batch_size, seed=cfg.seed)
    rng = random.Random(cfg.seed)
    eval_pairs = make_pairs(eval_rows, random.Random(cfg.seed + 10_000)) if eval_rows else []

    def evaluate() -> dict[str, float]:
        if not eval_pairs:
            return {}
        return {f"eval/rm/{k}": v for k, v in evaluate_pairs(rm, tokenizer, eval_pairs, tcfg.eval_batch_size).items()}

    def step() -> dict[str, float]:
        pairs = make_pairs(sampler.next_batch(), rng)
        stats = bt_step(rm, tokenizer, pairs, optimizer, algo.micro_batch_size, tcfg.max_grad_norm)
        return {f"rm/{k}": v for k, v in stats.items()}

    last = supervised_fit(tcfg, optimizer, step, evaluate, logger, "reward model",
                          lambda m: {"loss": f"{m['rm/loss']:.3f}", "acc": f"{m['rm/accuracy']:.2f}"})
    path = rm.save(Path(run_dir) / "reward_model", tokenizer)
    print(f"reward model saved to {path} (use: reward=reward_model reward.path={path})")
    return last
