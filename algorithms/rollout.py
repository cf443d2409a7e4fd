"""Rollout: batched sampling of G completions per prompt with a KV cache, shared by PPO and GRPO.

The sampling loop is written out (rather than `model.generate`) so that the log-prob of every
sampled token under the temperature-scaled policy is recorded as it is drawn: those are the "old"
log-probs of the PPO ratio, and with one optimisation pass per rollout no second forward is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedTokenizerBase

from parallel.fsdp import sampling_weights


@dataclass
class Rollout:
    """One batch of N = P * G samples, laid out group-contiguous (the G samples of a prompt adjacent)."""

    prompt_ids: Tensor  # [N, Tp] left-padded
    prompt_mask: Tensor  # [N, Tp]
    completion_ids: Tensor  # [N, Tc] padded after EOS
    completion_mask: Tensor  # [N, Tc] 1 up to and including EOS
    logp: Tensor  # [N, Tc] sampling-time log-probs, fp32 (0 on padding)
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens
    prompts: list[str]  # [N] prompt text per sample
    completions: list[str]  # [N] decoded completion, special tokens removed
    rows: list[dict]  # [N] the data row of each sample's prompt

    @property
    def input_ids(self) -> Tensor:  # [N, Tp + Tc]
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # [N, Tp + Tc]
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def completion_lengths(self) -> Tensor:  # [N]
        return self.completion_mask.sum(-1)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Set logits outside the nucleus of mass `top_p` to -inf (the top token is always kept)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def draw_tokens(probs: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """One token per row of probs [N, V] -> [N].

    With one generator per prompt (a list of P, rows group-contiguous) each group draws its own noise,
    so a sample does not depend on which other prompts share its batch or rank. The draw is the
    exponential race argmax(p / E), E ~ Exp(1), an exact sample from p (what torch.multinomial
    itself does for one sample).
    """
    if not isinstance(generator, list):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    groups = probs.chunk(len(generator))
    noise = torch.cat([torch.empty_like(g).exponential_(generator=gen) for g, gen in zip(groups, generator)])
    return (probs / noise).argmax(-1)


@torch.inference_mode()
def _sample(
    model: torch.nn.Module,
    prompt_ids: Tensor,  # [P, Tp] each distinct prompt once
    prompt_mask: Tensor,  # [P, Tp]
    group_size: int,  # G: samples per prompt; N = P * G
    stop_ids: Tensor,  # [S]
    pad_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | list[torch.Generator] | None,  # a list: one per prompt
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    cache = DynamicCache()
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    # the prefill runs once per distinct prompt, and only the last position becomes logits
    out = model(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids,
        cache=cache, use_cache=True, logits_to_keep=1,
    )
    if group_size > 1:  # then the prompt's cache is copied to its G samples
        cache.batch_repeat_interleave(group_size)
    logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)  # [N, V]
    mask = prompt_mask.repeat_interleave(group_size, dim=0)  # [N, Tp]
    next_pos = position_ids[:, -1:].repeat_interleave(group_size, dim=0) + 1  # [N, 1]
    N = mask.shape[0]
    finished = torch.zeros(N, dtype=torch.bool, device=prompt_ids.device)
    tokens, logps = [], []
    for _ in tqdm(range(max_new_tokens), desc="generate", leave=False, disable=not progress):
        z = logits.float() / temperature  # [N, V]
        logp_all = torch.log_softmax(z, dim=-1)
        probs = torch.softmax(top_p_filter(z, top_p), dim=-1)
        token = draw_tokens(probs, generator)  # [N]
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        # the ratio's denominator is the untruncated policy, matching what training recomputes
        logps.append(torch.where(finished, 0.0, logp_all.gather(-1, token[:, None]).squeeze(-1)))
        tokens.append(token)
        finished = finished | torch.isin(token, stop_ids)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=next_pos,
            cache=cache, use_cache=True,
        )
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    completion_ids = torch.stack(tokens, dim=1)  # [N, Tc]
    logp = torch.stack(logps, dim=1)  # [N, Tc]
    # a position is real if no stop token came strictly before it
    is_stop = torch.isin(completion_ids, stop_ids).long()
    completion_mask = (is_stop.cumsum(-1) - is_stop) == 0
    return completion_ids.clone(), completion_mask.long().clone(), logp.clone()


def generate_rollout(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    prompt_seeds: list[int] | None = None,
) -> Rollout:
    """Sample `group_size` completions for each row's "prompt"; returns a group-contiguous Rollout.

    prompt_seeds: one seed per row; each prompt's samples then come from its own generator (and
    `generator` is not used), independent of the batch they are drawn in. A model sharded over ranks
    samples on its gathered weights (parallel.fsdp.sampling_weights), with no collective per token.
    """
    device = next(model.parameters()).device
    if prompt_seeds is not None:
        if len(prompt_seeds) != len(rows):
            raise ValueError(f"{len(prompt_seeds)} prompt seeds for {len(rows)} prompts")
        generator = [torch.Generator(device=device).manual_seed(int(s)) for s in prompt_seeds]
    elif generator is not None and generator.device.type != device.type:
        # a CPU generator cannot drive sampling on a GPU: seed a generator there from it, deterministically
        seed = int(torch.randint(2**62, (1,), generator=generator))
        generator = torch.Generator(device=device).manual_seed(seed)
    prompts = [row["prompt"] for row in rows for _ in range(group_size)]
    sample_rows = [row for row in rows for _ in range(group_size)]
    enc = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    unique_ids, unique_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # [P, Tp]
    stop_ids = torch.tensor(stop_token_ids(tokenizer, model), device=device)
    was_training = model.training
    model.eval()
    # a sharded model samples on gathered weights: ranks stop at different steps (parallel.fsdp)
    with sampling_weights(model):
        completion_ids, completion_mask, logp = _sample(
            model, unique_ids, unique_mask, group_size, stop_ids, tokenizer.pad_token_id,
            max_new_tokens, temperature, top_p, generator, progress,
        )
    prompt_ids = unique_ids.repeat_interleave(group_size, dim=0)  # [N, Tp]
    prompt_mask = unique_mask.repeat_interleave(group_size, dim=0)
    model.train(was_training)
    truncated = ~torch.isin(completion_ids, stop_ids).any(-1)
    texts = tokenizer.batch_decode(completion_ids * completion_mask + tokenizer.pad_token_id * (1 - completion_mask),
                                   skip_special_tokens=True)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, logp=logp, truncated=truncated,
        prompts=prompts, completions=texts, rows=sample_rows,
    )
