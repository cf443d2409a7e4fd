"""The decoder pass that every log-prob and value computation starts from: hidden states of the
positions that predict the completion tokens.

GRPO samples G completions per prompt, so a batch holds each prompt G times. Running the prompt once
per distinct prompt and letting the G completions attend to its key/value cache gives the same hidden
states (same positions, same mask, same weights) for 1/G of the prompt's compute, and the gradient
still reaches the prompt positions through the cache. With ~100 prompt tokens and 64 completion
tokens at G=4 that is 45% fewer token-passes through the decoder, in the reference pass and in
training alike.

Whether a batch has repeated prompts is decided per rank. A decoder sharded over ranks (parallel.fsdp)
runs collectives in every layer, so every rank must make the same passes: the process then registers
how ranks agree (`set_prefill_agreement`), and a prefill is shared on every rank or on none.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from models.padding_free import packed_hidden

# A causal LM as this code reads one: transformers' PreTrainedModel, peft's PeftModel or a models.lora.AdapterView,
# FSDP-sharded or not. They share get_decoder(), get_output_embeddings() and config, but no class declares them:
# torch types the other attributes of an nn.Module as `Tensor | Module`. So, to the type checker, Any.
CausalLM = Any

# (this rank's choice) -> the choice every rank makes
PrefillAgreement = Callable[[bool], bool]

_prefill_agreement: dict[str, PrefillAgreement | None] = {"agree": None}  # None: each process decides alone


def set_prefill_agreement(agree: PrefillAgreement | None) -> None:
    """How the ranks of this process's run agree on sharing prefills; None (the default): no agreement.

    parallel.fsdp registers an all-reduce ("any rank") when it shards the models. It applies to every
    `completion_hidden` call of the process, which under FSDP is right: every model that runs this pass
    (actor, reference, critic) is sharded, and every rank runs each pass.
    """
    _prefill_agreement["agree"] = agree


def _cache_keyword() -> str:
    """The forwards' name for the KV cache: `cache` since transformers 5.2x, `past_key_values` before (5.17, the
    GPU machines' version, takes `cache` silently into **kwargs and runs without it)."""
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


CACHE_KEYWORD = _cache_keyword()


def with_cache(cache: Any) -> dict[str, Any]:
    """The keyword arguments that give a transformers forward its KV cache, whatever this version calls it."""
    return {CACHE_KEYWORD: cache, "use_cache": True}


def is_checkpointing(model: CausalLM) -> bool:
    """Whether activation checkpointing is on: `is_activation_checkpointing` since transformers 5.2x (and on
    models.lora.AdapterView), `is_gradient_checkpointing` before (5.17, the GPU machines' version)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        flag = getattr(model, name, None)
        if flag is not None:
            return bool(flag)
    return False


@dataclass
class PassTally:
    """What the decoder passes over prompt + completion (`completion_hidden`: old log-probs, reference, the
    training passes, critic values; `sequence_hidden`: reward-model scores) forwarded while it was open, counted
    as they run."""

    # the real-token counts stay on the device until `metrics` (no host sync per pass)
    forwarded: float = 0.0  # positions the decoder ran, padding included
    # 2 x decoder parameters per forwarded position, + 4 x when a backward follows (grad enabled): the decoder's
    # dense FLOPs (Kaplan et al. 2020; attention's quadratic term left out) of what really ran, padding included;
    # under FSDP the parameters are this rank's shards
    flops: float = 0.0
    real: float | Tensor = 0.0  # of which real tokens
    prompt_repeats_avoided: float | Tensor = 0.0  # real prompt tokens a shared prefill did not run again

    def metrics(self) -> dict[str, float]:
        """compute/pass_*: empty when no pass ran."""
        if not self.forwarded:
            return {}
        real = float(self.real)
        return {
            "compute/pass_forward_tokens": self.forwarded,
            "compute/pass_real_tokens": real,
            "compute/pass_padding_frac": 1.0 - real / self.forwarded,
            "compute/pass_prompt_repeats_avoided": float(self.prompt_repeats_avoided),
            "compute/pass_flops": self.flops,
        }


_tallies: list[PassTally] = []  # the open tallies (nested ones all count)
# budget: tokens per packed row (0: the padded passes); dense: sdpa with the layout's dense mask, not unit by unit
_packing: dict[str, int] = {"budget": 0, "dense": 0}


@contextmanager
def packed_passes(budget: int, dense_mask: bool = False) -> Iterator[None]:
    """Run every decoder pass of the block packed (`models.padding_free`: real tokens end to end, rows of at most
    `budget` tokens); 0 keeps the padded passes. An algorithm opens it around its step (algo.micro_batch_tokens).
    dense_mask: sdpa attention over the whole row under the layout's mask (the baseline `experiments/bench_train.py`
    measures unit attention against) rather than unit by unit (models.unit_attention)."""
    before = dict(_packing)
    _packing.update(budget=budget, dense=int(dense_mask))
    try:
        yield
    finally:
        _packing.update(before)


@contextmanager
def tally_passes() -> Iterator[PassTally]:
    """Count the tokens every `completion_hidden` call forwards while the block runs."""
    tally = PassTally()
    _tallies.append(tally)
    try:
        yield tally
    finally:
        _tallies.remove(tally)


def _count(decoder: torch.nn.Module, forwarded: float, real: float | Tensor, avoided: float | Tensor = 0.0) -> None:
    params = sum(p.numel() for p in decoder.parameters())
    backward = torch.is_grad_enabled() and any(p.requires_grad for p in decoder.parameters())
    for tally in _tallies:  # not in place: `real` may come from a pass under inference_mode (reward scoring)
        tally.forwarded += forwarded
        tally.flops += (6.0 if backward else 2.0) * params * forwarded
        tally.real = tally.real + real
        tally.prompt_repeats_avoided = tally.prompt_repeats_avoided + avoided


def position_ids(attention_mask: Tensor) -> Tensor:
    """[B, T] position of each token under left padding (padding at 0): what the HF forwards are given."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding shifts positions


def completion_hidden(
    decoder: torch.nn.Module,  # a causal LM's decoder (embeddings + blocks, no lm_head), e.g. model.get_decoder()
    input_ids: Tensor,  # [B, Tp + Tc] prompt (left-padded) then completion (right-padded)
    attention_mask: Tensor,  # [B, Tp + Tc]
    completion_len: int,  # Tc
    share_prompts: bool = True,
) -> Tensor:
    """Hidden states [B, Tc, H] of the positions whose next token is completion token t = 0 .. Tc - 1.

    With share_prompts, rows whose prompt (ids and mask) is identical share one prefill; the result
    equals the plain full-sequence pass up to float rounding. Gradient checkpointing runs without a
    cache in transformers, so then (and when every prompt is distinct) the plain pass is used.
    """
    tp = input_ids.shape[1] - completion_len
    packed = _packing["budget"] > 0  # then sequence_hidden runs it, the prompts shared in its layout
    checkpointing = is_checkpointing(decoder) and decoder.training
    if share_prompts and tp > 0 and not checkpointing and not packed:
        prompt_key = torch.cat([input_ids[:, :tp], attention_mask[:, :tp].to(input_ids.dtype)], dim=1)
        unique, inverse = torch.unique(prompt_key, dim=0, return_inverse=True)  # [U, 2 Tp], [B]
        share = unique.shape[0] < input_ids.shape[0]
        agree = _prefill_agreement["agree"]
        if agree is not None:  # sharded over ranks: the same passes everywhere
            share = agree(share)
        if share:
            if _tallies:
                unique_real = unique[:, tp:].sum()  # the distinct prompts' real tokens
                _count(
                    decoder,
                    unique.shape[0] * tp + input_ids.shape[0] * completion_len,
                    unique_real + attention_mask[:, tp:].sum(),
                    attention_mask[:, :tp].sum() - unique_real,
                )
            return _shared_prefix_hidden(
                decoder,
                input_ids,
                attention_mask,
                completion_len,
                unique[:, :tp],
                unique[:, tp:].to(attention_mask.dtype),
                inverse,
            )
    hidden = sequence_hidden(decoder, input_ids, attention_mask, tp, share_prompts)  # [B, Tp + Tc, H]
    return hidden[:, -completion_len - 1 : -1]  # position t predicts token t + 1


def sequence_hidden(
    decoder: torch.nn.Module,
    input_ids: Tensor,  # [B, T] (left-padded; with prompt_len, prompt left-padded then completion right-padded)
    attention_mask: Tensor,  # [B, T]
    prompt_len: int = 0,  # Tp: the columns that hold the prompt, shared by the rows where it is identical
    share_prompts: bool = True,
) -> Tensor:
    """Last hidden states [B, T, H] of every position (padding: 0 when packed), packed inside a `packed_passes`
    block, one padded pass outside it."""
    budget = _packing["budget"]
    if budget <= 0:
        if _tallies:
            _count(decoder, input_ids.numel(), attention_mask.sum())
        return decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        ).last_hidden_state
    hidden, layout = packed_hidden(
        decoder, input_ids, attention_mask, prompt_len, budget, share_prompts, dense_mask=bool(_packing["dense"])
    )
    if _tallies:
        _count(decoder, layout.forwarded, layout.real, layout.prompt_repeats_avoided)
    return hidden


def _shared_prefix_hidden(decoder, input_ids, attention_mask, completion_len, prompt_ids, prompt_mask, inverse):
    tp = prompt_ids.shape[1]
    cache = DynamicCache()
    prefill = decoder(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids(prompt_mask),
        **with_cache(cache),
    ).last_hidden_state  # [U, Tp, H]
    cache.batch_select_indices(inverse)  # [U, ...] -> [B, ...]: an indexing op, so gradients flow back
    positions = position_ids(attention_mask)[:, tp:]  # [B, Tc]
    completion = decoder(
        input_ids=input_ids[:, tp:], attention_mask=attention_mask, position_ids=positions, **with_cache(cache)
    ).last_hidden_state  # [B, Tc, H]
    # the last prompt position predicts completion token 0; completion position t predicts token t + 1
    return torch.cat([prefill[inverse, -1:], completion[:, : completion_len - 1]], dim=1)
