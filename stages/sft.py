"""Supervised fine-tuning (algo=sft): the cold start of the R1 recipe.

Each row becomes prompt -> `<think>\\n{cot}\\n</think>\\n{response}<eos>`, where the prompt is the row's
question in the model's chat template (data.loading.attach_prompts) and the target is what the
assistant turn should say. The loss is the token-mean negative log-likelihood of the target tokens
only: the prompt conditions the model but is never trained on. A batch is laid out like a rollout
(left-padded prompt, right-padded target with its mask), so the log-prob pass, gradient accumulation,
clipping and NaN guard are the RL update's own (models.logprobs, training.update), and the stage runs
in the one training loop (training.loop.Trainer: resume, interrupt checkpoints, logging).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.common import micro_logprobs
from conf.checks import check_range
from conf.options import option
from conf.registry import register_stage
from data.loading import Batch, PromptSampler
from models.heads import ScalarHeadModel
from rewards.text import THINK_CLOSE, THINK_OPEN
from training.loop import Built, StageContext, StepOutput
from training.timers import PhaseTimer
from training.update import MicroBatch, MicroShare, OptimTarget, actor_target, minibatch_update

SENTENCE_ENDS = (". ", ".\n", "? ", "?\n", "! ", "!\n", "\n\n")


@dataclass
class SFTConfig:
    name: str = option("sft", "the stage's name (algo=<name>)")
    batch_size: int = option(4, "rows per optimiser step")
    micro_batch_size: int = option(4, "rows per forward/backward; gradients accumulate up to batch_size")
    micro_batch_tokens: int = option(
        0, "> 0: micro-batches of at most this many real tokens, run packed (micro_batch_size unused); 0: padded"
    )
    max_length: int = option(512, "prompt + target tokens; a longer row loses the end of its target (counted)")
    # cut so that `</think>` and the answer stay within a short (CPU-sized, at these defaults) generation budget
    max_cot_tokens: int | None = option(
        32,
        "the reference chain of thought is cut to its first N tokens (at a sentence end when one is close); "
        "null = whole",
    )
    max_response_tokens: int | None = option(
        48, "the reference response is cut to its first N tokens (at a sentence end when one is close); null = whole"
    )
    lr: float | None = option(
        2e-4, "AdamW learning rate of this stage; null = trainer.lr (SFT wants a larger step than RL)"
    )

    def __post_init__(self) -> None:
        if self.lr is not None:
            check_range("algo.lr", self.lr, 0.0)
        check_range("algo.micro_batch_tokens", self.micro_batch_tokens, 0)
        for key in ("batch_size", "micro_batch_size", "max_length"):
            check_range(f"algo.{key}", getattr(self, key), 1)
        for key in ("max_cot_tokens", "max_response_tokens"):
            if getattr(self, key) is not None:
                check_range(f"algo.{key}", getattr(self, key), 1)


@dataclass
class SFTExample:
    prompt_ids: list[int]  # the rendered prompt (chat template, generation prompt included)
    target_ids: list[int]  # the assistant's tokens, EOS included unless truncated
    truncated: bool  # the target lost its end to algo.max_length


def clip_text(tokenizer, text: str, max_tokens: int | None) -> str:
    """The first `max_tokens` tokens of `text`, cut back to the last sentence end in their second half
    (so that a clipped chain of thought still ends on a whole sentence); `text` itself when it fits."""
    if max_tokens is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    head = tokenizer.decode(ids[:max_tokens])
    cut = max(head.rfind(end) for end in SENTENCE_ENDS)
    return head[: cut + 1].rstrip() if cut >= len(head) // 2 else head.rstrip()


def render_target(cot: str, response: str, prompt: str = "") -> str:
    """The assistant turn of an SFT row: `<think>\\n{cot}\\n</think>\\n{response}`.

    When the chat template already opened the think block (the prompt ends with `<think>`, as
    R1-Distill's does), the target starts inside it instead of opening a second one.
    """
    target = f"{THINK_OPEN}\n{cot}\n{THINK_CLOSE}\n{response}"
    if prompt.rstrip().endswith(THINK_OPEN):
        return target[len(THINK_OPEN) :].lstrip("\n")
    return target


def encode_example(tokenizer, prompt: str, target: str, max_length: int) -> SFTExample:
    """Prompt and target token ids, tokenised apart so that the boundary between them is exact.

    The target ends with the EOS token (the model learns to stop); when prompt + target exceed
    `max_length` tokens the target is cut at the end (and loses its EOS), which is reported.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max(max_length - len(prompt_ids), 1)  # attach_prompts already dropped over-long prompts
    return SFTExample(prompt_ids, target_ids[:room], len(target_ids) > room)


def build_examples(rows: list[dict], tokenizer, cfg: SFTConfig) -> list[SFTExample]:
    """SFT examples of data rows with a "prompt", "cot" and "reference" (data.kind=sft), per `cfg` (SFTConfig)."""
    examples = []
    for row in rows:
        cot = clip_text(tokenizer, row["cot"], cfg.max_cot_tokens)
        response = clip_text(tokenizer, row["reference"], cfg.max_response_tokens)
        examples.append(
            encode_example(tokenizer, row["prompt"], render_target(cot, response, row["prompt"]), cfg.max_length)
        )
    return examples


def collate(examples: list[SFTExample], pad_id: int) -> dict[str, Tensor]:
    """A rollout-shaped batch: prompt_ids/prompt_mask [B, Tp] left-padded, completion_ids/completion_mask
    [B, Tc] right-padded (the mask is 1 exactly on the target tokens, the ones the loss trains)."""
    tp = max(len(e.prompt_ids) for e in examples)
    tc = max(len(e.target_ids) for e in examples)
    B = len(examples)
    prompt_ids = torch.full((B, tp), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(B, tp, dtype=torch.long)
    completion_ids = torch.full((B, tc), pad_id, dtype=torch.long)
    completion_mask = torch.zeros(B, tc, dtype=torch.long)
    for i, e in enumerate(examples):
        prompt_ids[i, tp - len(e.prompt_ids) :] = torch.tensor(e.prompt_ids)
        prompt_mask[i, tp - len(e.prompt_ids) :] = 1
        completion_ids[i, : len(e.target_ids)] = torch.tensor(e.target_ids)
        completion_mask[i, : len(e.target_ids)] = 1
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }


def sft_loss(logp: Tensor, mask: Tensor, num_tokens: float) -> Tensor:
    """Negative log-likelihood of the target tokens: -sum(logp * mask) / num_tokens.

    logp, mask: [B, Tc]. `num_tokens` is the target-token count of the whole optimiser batch, so that
    micro-batches of unequal length add up to the batch's token mean (as an unsplit batch would give).
    """
    return -(logp * mask).sum() / max(num_tokens, 1.0)


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.inference_mode()
def evaluate_nll(policy, examples: list[SFTExample], pad_id: int, batch_size: int) -> float:
    """Token-mean negative log-likelihood of the targets of `examples` (the held-out loss)."""
    total, tokens = 0.0, 0.0
    device = next(policy.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start : start + batch_size], pad_id), device)
        logp, _ = micro_logprobs(policy, batch, temperature=1.0)
        total += float(-(logp * batch["completion_mask"]).sum())
        tokens += float(batch["completion_mask"].sum())
    return total / max(tokens, 1.0)


def sft_update(
    policy, batch: dict[str, Tensor], targets: list[OptimTarget], micro_batch: MicroBatch | int
) -> dict[str, float]:
    """One optimiser step on `batch` (gradients accumulated over micro-batches); returns its stats,
    with minibatch_update's optimizer_steps / skipped_steps (a non-finite loss or gradient skips it)
    and its oom/ back-off counters."""

    def loss_fn(micro: dict[str, Tensor], share: MicroShare):
        logp, _ = micro_logprobs(policy, micro, temperature=1.0)
        loss = sft_loss(logp, micro["completion_mask"], share.minibatch_tokens)  # a sum over the batch's tokens
        # the micro-batch's own token mean, for the log
        tokens = max(float(micro["completion_mask"].sum()), 1.0)
        return loss, {"loss": loss.detach() * share.minibatch_tokens / tokens}

    policy.train()
    stats = minibatch_update(
        batch,
        loss_fn,
        targets,
        num_epochs=1,
        minibatch_size=batch["completion_mask"].shape[0],
        micro_batch=micro_batch,
        shuffle=False,
    )
    policy.eval()
    return stats


class SFT:
    """The SFT step on a policy (training.loop.Algorithm): one optimiser step on a batch of examples."""

    progress = {"loss": "sft/loss"}

    def __init__(
        self,
        cfg: SFTConfig,
        policy: torch.nn.Module,
        pad_id: int,
        target: OptimTarget,
        held_out: list[SFTExample],
        eval_batch_size: int,
        max_oom_retries: int,
    ):
        self.cfg, self.policy, self.pad_id, self.target = cfg, policy, pad_id, target
        # halved on out of memory
        self.micro_batch = MicroBatch(cfg.micro_batch_size, max_oom_retries, tokens=cfg.micro_batch_tokens)
        self.held_out, self.eval_batch_size = held_out, eval_batch_size
        self.device = next(policy.parameters()).device

    def step(self, batch: Batch) -> StepOutput:
        examples: list[SFTExample] = batch.rows  # the sampler draws encoded examples, not raw rows
        timer = PhaseTimer()
        tensors = to_device(collate(examples, self.pad_id), self.device)
        with timer("train"):
            stats = sft_update(self.policy, tensors, [self.target], self.micro_batch)
        metrics = {("sft/loss" if key == "loss" else key): value for key, value in stats.items()}
        metrics["sft/truncated_frac"] = sum(e.truncated for e in examples) / len(examples)
        # per step: the loop keeps the running tokens/trained_total (and restores it on resume)
        metrics["tokens/trained"] = float(tensors["completion_mask"].sum())
        metrics.update(timer.metrics())
        return StepOutput(metrics)

    def evaluate(self) -> StepOutput:
        if not self.held_out:
            return StepOutput({})
        return StepOutput(
            {"eval/sft/loss": evaluate_nll(self.policy, self.held_out, self.pad_id, self.eval_batch_size)}
        )

    def checkpoint_models(self) -> dict[str, ScalarHeadModel]:
        return {}  # the policy is saved by the loop

    def state_dict(self) -> dict:
        # besides the weights, optimiser, schedule, RNGs and data position the loop saves
        return {"micro_batch": self.micro_batch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.micro_batch.load_state_dict(state.get("micro_batch"))  # absent from older checkpoints


@register_stage("sft", SFTConfig, kind="supervised", trains_policy=True, objective="eval/sft/loss")
def build_sft(ctx: StageContext) -> Built:
    """SFT of ctx.policy on the data rows' chains of thought and responses (data.kind=sft)."""
    cfg, algo = ctx.cfg, ctx.cfg.algo
    assert ctx.policy is not None  # a looped stage's context always has the policy (run.py)
    if cfg.data.kind != "sft":
        raise ValueError(
            f"algo=sft needs rows with a chain of thought and a response: data.kind=sft "
            f"(data=medical_o1), not data.kind={cfg.data.kind} (data={cfg.data.name})"
        )
    train = build_examples(ctx.train_rows, ctx.tokenizer, algo)
    held_out = build_examples(ctx.eval_rows, ctx.tokenizer, algo)
    if ctx.logger is not None:
        ctx.logger.log(
            {
                "data/sft_truncated": float(sum(e.truncated for e in train + held_out)),
                "data/sft_target_tokens_mean": sum(len(e.target_ids) for e in train) / len(train),
            },
            step=0,
        )
    target, optimizer = actor_target(ctx.policy, cfg.trainer, lr=algo.lr)
    sft = SFT(
        algo,
        ctx.policy,
        ctx.tokenizer.pad_token_id,
        target,
        held_out,
        cfg.trainer.eval_batch_size,
        cfg.trainer.max_oom_retries,
    )
    return Built(sft, {"actor": optimizer}, PromptSampler(train, algo.batch_size, seed=cfg.seed))
