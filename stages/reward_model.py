"""Reward-model training (algo=reward_model): Bradley-Terry on preference pairs built from data rows.

A pair opposes the row's reference response (chosen) to a worse response to the same prompt
(rejected, `algo.rejected`): the reference of another question (other_response), the reference cut
short (truncated), or a sample of the untrained policy (policy_sample). The stage runs in the one
training loop (training.loop.Trainer: resume, interrupt checkpoints, the NaN guard, logging), which
checkpoints the reward model beside the policy (`checkpoints/<step>/reward_model/`). At the end the
trained model is saved to `<run_dir>/reward_model`, which `reward=reward_model reward.path=...`
scores RL samples with.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from algorithms.losses import bradley_terry_loss
from algorithms.policy_gradient import EVAL_SEED_OFFSET
from algorithms.rollout import generate_rollout
from conf.checks import check_choice, check_range
from conf.options import option
from conf.registry import register_stage
from data.loading import Batch, PromptSampler
from models.heads import RewardModel, ScalarHeadModel, encode_texts
from training.loop import Built, StageContext, StepOutput
from training.timers import PhaseTimer
from training.update import MicroBatch, MicroShare, OptimTarget, minibatch_update, optim_target

REJECTED = ("other_response", "truncated", "policy_sample")
BT_STATS = ("loss", "accuracy", "margin")  # the update's statistics logged under rm/


@dataclass
class RewardModelConfig:
    name: str = option("reward_model", "the stage's name (algo=<name>)")
    rejected: str = option(
        "other_response",
        "what a preference pair opposes to the row's reference response (the chosen one): other_response (the "
        "reference of another question) | truncated (the reference cut short) | policy_sample (the policy's answer)",
    )
    truncate_frac: float = option(0.5, "rejected=truncated: share of the reference's words kept, in [0, 1]")
    batch_size: int = option(8, "preference pairs per optimiser step")
    micro_batch_size: int = option(8, "pairs per forward/backward (gradient accumulation up to batch_size)")
    micro_batch_tokens: int = option(
        0, "> 0: micro-batches of pairs with at most this many real tokens, run packed (micro_batch_size unused)"
    )
    max_response_tokens: int = option(
        256, "responses are cut to this many tokens, chosen and rejected alike (before the truncated variant is made)"
    )
    max_new_tokens: int = option(48, "rejected=policy_sample: the policy's completion budget, in tokens")
    temperature: float = option(1.0, "rejected=policy_sample: the policy's sampling temperature")
    top_p: float = option(1.0, "rejected=policy_sample: nucleus sampling (1.0 = off)")

    def __post_init__(self) -> None:
        check_choice("algo.rejected", self.rejected, REJECTED)
        check_range("algo.truncate_frac", self.truncate_frac, 0.0, 1.0)
        check_range("algo.micro_batch_tokens", self.micro_batch_tokens, 0)
        for key in ("batch_size", "micro_batch_size", "max_response_tokens", "max_new_tokens"):
            check_range(f"algo.{key}", getattr(self, key), 1)
        check_range("algo.temperature", self.temperature, 1e-3)
        check_range("algo.top_p", self.top_p, 1e-3, 1.0)


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
    return [
        {**r, "reference": tokenizer.decode(t[:max_tokens]) if len(t) > max_tokens else r["reference"]}
        for r, t in zip(rows, ids)
    ]


def build_pairs(
    rows: list[dict],
    pool: list[dict],
    rejected: str,
    rng: random.Random,
    truncate_frac: float = 0.5,
    samples: list[str] | None = None,
) -> list[PreferencePair]:
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
            assert samples is not None  # the caller samples them for rejected=policy_sample
            other = samples[i]
        else:
            raise ValueError(f"rejected={rejected!r}; choose one of: {', '.join(REJECTED)}")
        pairs.append(PreferencePair(row["prompt"], chosen, other))
    return pairs


def pair_tensors(tokenizer, pairs: list[PreferencePair], device: torch.device | str) -> dict[str, Tensor]:
    """Pairs as tensors with a leading pair dimension B, the form training.update.minibatch_update slices.

    input_ids, completion_mask: [B, 2, T], chosen (index 0 of dim 1) and rejected (1) prompt + response,
    tokenised together and left-padded as RewardModel.score reads them (and as the RL reward scores
    samples, rewards.reward_model); the mask is the attention mask, so minibatch_update counts real tokens.
    prompt_mask: [B, 0]: the prompt is inside each sequence, there is no separate prompt block to trim.
    """
    prompts = [p.prompt for p in pairs]
    enc = encode_texts(tokenizer, prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], device)
    B = len(pairs)
    ids, mask = enc["input_ids"], enc["attention_mask"]  # [2B, T]: the chosen responses, then the rejected ones
    return {
        "input_ids": torch.stack([ids[:B], ids[B:]], dim=1),
        "completion_mask": torch.stack([mask[:B], mask[B:]], dim=1),
        "prompt_mask": mask.new_zeros(B, 0),
    }


def pair_scores(rm: RewardModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(r_chosen [b], r_rejected [b]) of pair tensors (pair_tensors) from one forward over the 2b sequences."""
    ids, mask = batch["input_ids"].flatten(0, 1), batch["completion_mask"].flatten(0, 1)  # [2b, T]
    first = int(mask.any(0).long().argmax())  # columns before it are left padding in every sequence
    scores = rm.score(ids[:, first:], mask[:, first:]).view(-1, 2)  # [b, 2]
    return scores[:, 0], scores[:, 1]


def bt_update(
    rm: RewardModel, batch: dict[str, Tensor], targets: list[OptimTarget], micro_batch: MicroBatch | int
) -> dict[str, float]:
    """One optimiser step on the pairs of `batch` (pair_tensors; gradients accumulated over micro-batches);
    returns the mean loss, accuracy and margin, with minibatch_update's grad norm and optimizer_steps /
    skipped_steps (a non-finite loss or gradient skips the step, as in the RL update)."""

    def loss_fn(micro: dict[str, Tensor], share: MicroShare):
        loss, stats = bradley_terry_loss(*pair_scores(rm, micro))
        return loss * share.sequences, {"loss": loss.detach(), **stats}  # the pair mean over the whole batch

    rm.train()
    stats = minibatch_update(
        batch,
        loss_fn,
        targets,
        num_epochs=1,
        minibatch_size=batch["input_ids"].shape[0],
        micro_batch=micro_batch,
        shuffle=False,
    )
    rm.eval()
    return stats


@torch.inference_mode()
def evaluate_pairs(rm: RewardModel, tokenizer, pairs: list[PreferencePair], batch_size: int = 8) -> dict[str, float]:
    """Held-out pairwise accuracy, loss and margin over `pairs`."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        c, r = pair_scores(rm, pair_tensors(tokenizer, pairs[start : start + batch_size], rm.device))
        chosen.append(c)
        rejected.append(r)
    loss, stats = bradley_terry_loss(torch.cat(chosen), torch.cat(rejected))
    return {"loss": float(loss), "accuracy": float(stats["accuracy"]), "margin": float(stats["margin"])}


class RewardModelTraining:
    """The Bradley-Terry step on a reward model (training.loop.Algorithm): pairs from a batch of rows,
    one optimiser step on them."""

    progress = {"loss": "rm/loss", "acc": "rm/accuracy"}

    def __init__(
        self,
        cfg: RewardModelConfig,
        ctx: StageContext,
        rm: RewardModel,
        target: OptimTarget,
        train_rows: list[dict],
        eval_rows: list[dict],
    ):
        self.cfg, self.rm, self.target = cfg, rm, target
        retries = ctx.cfg.trainer.max_oom_retries
        self.micro_batch = MicroBatch(cfg.micro_batch_size, retries, tokens=cfg.micro_batch_tokens)  # halved on OOM
        self.policy, self.tokenizer, self.generator = ctx.policy, ctx.tokenizer, ctx.generator
        self.everything = train_rows + eval_rows
        self.eval_batch_size = ctx.cfg.trainer.eval_batch_size
        self.output = Path(ctx.run_dir) / "reward_model"
        self.rng = random.Random(ctx.cfg.seed)  # other_response picks: part of the resumed state
        eval_rng = random.Random(ctx.cfg.seed + EVAL_SEED_OFFSET)  # the same held-out pairs at every eval
        self.eval_pairs = self.make_pairs(eval_rows, eval_rng) if eval_rows else []

    def pool(self, rows: list[dict]) -> list[dict]:
        """Where other responses come from: the same split when it has two distinct references."""
        return rows if len({r["reference"] for r in rows}) > 1 else self.everything

    def make_pairs(self, rows: list[dict], rng: random.Random, seeds: list[int] | None = None) -> list[PreferencePair]:
        samples = None
        if self.cfg.rejected == "policy_sample":  # the policy is not trained here: its samples stay "worse"
            assert self.policy is not None  # run.py gives every looped stage the policy
            samples = generate_rollout(
                self.policy,
                self.tokenizer,
                rows,
                1,
                self.cfg.max_new_tokens,
                self.cfg.temperature,
                self.cfg.top_p,
                self.generator,
                prompt_seeds=seeds,
            ).completions
        return build_pairs(rows, self.pool(rows), self.cfg.rejected, rng, self.cfg.truncate_frac, samples)

    # ---- what the loop uses (training.loop.Algorithm) -------------------------------------------
    def step(self, batch: Batch) -> StepOutput:
        timer = PhaseTimer()
        with timer("pairs"):
            pairs = self.make_pairs(batch.rows, self.rng, batch.seeds)
            tensors = pair_tensors(self.tokenizer, pairs, self.rm.device)
        with timer("train"):
            stats = bt_update(self.rm, tensors, [self.target], self.micro_batch)
        # optimizer_steps / skipped_steps keep their names: the loop's NaN guard counts them
        metrics = {(f"rm/{key}" if key in BT_STATS else key): value for key, value in stats.items()}
        metrics["tokens/trained"] = float(tensors["completion_mask"].sum())  # the loop keeps the running total
        metrics.update(timer.metrics())
        return StepOutput(metrics)

    def evaluate(self) -> StepOutput:
        if not self.eval_pairs:
            return StepOutput({})
        metrics = evaluate_pairs(self.rm, self.tokenizer, self.eval_pairs, self.eval_batch_size)
        return StepOutput({f"eval/rm/{key}": value for key, value in metrics.items()})

    def checkpoint_models(self) -> dict[str, ScalarHeadModel]:
        return {"reward_model": self.rm}  # the loop saves the policy itself; the trained model goes beside it

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()  # json: the tuple of 625 ints becomes a list
        return {"pair_rng": [version, list(internal), gauss], "micro_batch": self.micro_batch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["pair_rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.micro_batch.load_state_dict(state.get("micro_batch"))  # absent from older checkpoints

    def save(self) -> None:
        """Write the trained model (with the tokenizer) where `reward=reward_model reward.path=` loads it."""
        path = self.rm.save(self.output, self.tokenizer)
        print(f"reward model saved to {path} (use: reward=reward_model reward.path={path})")


@register_stage("reward_model", RewardModelConfig, kind="supervised", objective="eval/rm/accuracy")
def build_reward_model(ctx: StageContext) -> Built:
    """A reward model on ctx.policy's backbone, its optimiser, and a sampler of rows with a reference.

    The loop's model stays the policy (checkpoints hold it in HF format); the reward model is saved
    beside it (checkpoint_models) and written to <run_dir>/reward_model when training ends (finish).
    """
    cfg, algo = ctx.cfg, ctx.cfg.algo
    train_rows = clip_references(ctx.train_rows, ctx.tokenizer, algo.max_response_tokens)
    eval_rows = clip_references(ctx.eval_rows, ctx.tokenizer, algo.max_response_tokens)
    if not train_rows:
        raise ValueError("algo=reward_model needs rows with a reference response (data.reference_field)")
    if algo.rejected == "other_response" and len({r["reference"] for r in train_rows + eval_rows}) < 2:
        raise ValueError("algo.rejected=other_response needs at least two different reference responses")
    # sampling needs the policy intact, so the reward model trains a copy of its backbone then
    rm = RewardModel.from_causal_lm(ctx.policy, copy_weights=algo.rejected == "policy_sample")
    target, optimizer = optim_target([p for p in rm.parameters() if p.requires_grad], cfg.trainer, "reward_model")
    training = RewardModelTraining(algo, ctx, rm, target, train_rows, eval_rows)
    sampler = PromptSampler(train_rows, algo.batch_size, seed=cfg.seed)
    return Built(training, {"reward_model": optimizer}, sampler, finish=training.save)
