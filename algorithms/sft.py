"""Supervised fine-tuning (algo=sft): the cold start of the R1 recipe.

Each row becomes prompt -> `<think>\\n{cot}\\n</think>\\n{response}<eos>`, where the prompt is the row's
question in the model's chat template (data.loading.attach_prompts) and the target is what the
assistant turn should say. The loss is the token-mean negative log-likelihood of the target tokens
only: the prompt conditions the model but is never trained on. A batch is laid out like a rollout
(left-padded prompt, right-padded target with its mask), so the log-prob pass, gradient accumulation,
clipping and NaN guard are the RL update's own (models.logprobs, algorithms.update).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from algorithms.checkpoint import save_checkpoint
from algorithms.common import actor_target, micro_logprobs
from algorithms.supervised import supervised_fit
from algorithms.tracking import RunLogger
from algorithms.update import minibatch_update
from conf.schema import Config
from data.loading import PromptSampler
from rewards.text import THINK_CLOSE, THINK_OPEN

SENTENCE_ENDS = (". ", ".\n", "? ", "?\n", "! ", "!\n", "\n\n")


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
        return target[len(THINK_OPEN):].lstrip("\n")
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


def build_examples(rows: list[dict], tokenizer, cfg) -> list[SFTExample]:
    """SFT examples of data rows with a "prompt", "cot" and "reference" (data.kind=sft), per `cfg` (SFTConfig)."""
    examples = []
    for row in rows:
        cot = clip_text(tokenizer, row["cot"], cfg.max_cot_tokens)
        response = clip_text(tokenizer, row["reference"], cfg.max_response_tokens)
        examples.append(encode_example(tokenizer, row["prompt"], render_target(cot, response, row["prompt"]),
                                       cfg.max_length))
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
        prompt_ids[i, tp - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
        prompt_mask[i, tp - len(e.prompt_ids):] = 1
        completion_ids[i, : len(e.target_ids)] = torch.tensor(e.target_ids)
        completion_mask[i, : len(e.target_ids)] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}


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


def sft_update(policy, batch: dict[str, Tensor], targets, micro_batch_size: int) -> dict[str, float]:
    """One optimiser step on `batch` (gradients accumulated over micro-batches); returns its stats."""

    def loss_fn(micro: dict[str, Tensor], share: float, batch_tokens: float):
        logp, _ = micro_logprobs(policy, micro, temperature=1.0)
        loss = sft_loss(logp, micro["completion_mask"], batch_tokens)
        # the micro-batch's own token mean, for the log
        return loss, {"loss": loss.detach() * batch_tokens / max(float(micro["completion_mask"].sum()), 1.0)}

    policy.train()
    stats = minibatch_update(batch, loss_fn, targets, num_epochs=1, minibatch_size=batch["completion_mask"].shape[0],
                             micro_batch_size=micro_batch_size, shuffle=False)
    policy.eval()
    return stats


def train_sft(cfg: Config, policy, tokenizer, train_rows: list[dict], eval_rows: list[dict], logger: RunLogger,
              run_dir: Path, generator: torch.Generator) -> dict[str, float]:
    """The algo=sft stage: trainer.max_steps optimiser steps of algo.batch_size rows; checkpoints/final."""
    algo, tcfg = cfg.algo, cfg.trainer
    if cfg.data.kind != "sft":
        raise ValueError(f"algo=sft needs rows with a chain of thought and a response: data.kind=sft "
                         f"(data=medical_o1), not data.kind={cfg.data.kind} (data={cfg.data.name})")
    train = build_examples(train_rows, tokenizer, algo)
    held_out = build_examples(eval_rows, tokenizer, algo)
    pad_id, device = tokenizer.pad_token_id, next(policy.parameters()).device
    logger.log({"data/sft_truncated": float(sum(e.truncated for e in train + held_out)),
                "data/sft_target_tokens_mean": sum(len(e.target_ids) for e in train) / len(train)}, step=0)
    if algo.lr is not None:
        tcfg = dataclasses.replace(tcfg, lr=algo.lr)
    target, optimizer = actor_target(policy, tcfg)
    sampler = PromptSampler(train, algo.batch_size, seed=cfg.seed)
    totals = {"tokens/trained_total": 0.0}

    def step() -> dict[str, float]:
        examples = sampler.next_batch()
        batch = to_device(collate(examples, pad_id), device)
        stats = sft_update(policy, batch, [target], algo.micro_batch_size)
        totals["tokens/trained_total"] += float(batch["completion_mask"].sum())
        return {f"sft/{k}" if k == "loss" else k: v for k, v in stats.items()} | totals | {
            "sft/truncated_frac": sum(e.truncated for e in examples) / len(examples)}

    def evaluate() -> dict[str, float]:
        return {"eval/sft/loss": evaluate_nll(policy, held_out, pad_id, tcfg.eval_batch_size)} if held_out else {}

    def save(name: str, step: int) -> Path:
        return save_checkpoint(Path(run_dir) / "checkpoints" / name, policy, tokenizer, {"actor": optimizer},
                               {"step": step, "sampler": sampler.state_dict(), "totals": totals})

    return supervised_fit(tcfg, optimizer, step, evaluate, logger, "sft", lambda m: {"loss": f"{m['sft/loss']:.3f}"},
                          save)
