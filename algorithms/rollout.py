"""Rollout: batched sampling of G completions per prompt with a KV cache, shared by PPO and GRPO.

The sampling loop is written out (rather than `model.generate`) so that the log-prob of every
sampled token under the temperature-scaled policy is recorded as it is drawn: those are the "old"
log-probs of the PPO ratio, and with one optimisation pass per rollout no second forward is needed.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedTokenizerBase

from conf.checks import ConfigError, check_choice, check_range
from conf.options import option
from models.decode import StaticDecoder, sample_token, supports_static_cache, top_p_filter
from models.forward import position_ids, with_cache
from models.packed import packable
from parallel.fsdp import is_sharded, sampling_weights

__all__ = ["Rollout", "RolloutConfig", "generate_rollout", "stop_token_ids", "top_p_filter"]


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


@dataclass
class RolloutConfig:
    """How completions are decoded (`algo.rollout.*`); none of it changes what is drawn."""

    cache: str = option(
        "static", "KV cache: static (preallocated, fixed-shape steps: models.decode) | dynamic (growing)"
    )
    # off on a CPU: compiling costs more than it saves at these sizes (experiments/bench_rollout.py)
    compile: str = option(
        "auto",
        "torch.compile the static decode step: auto (on CUDA, mode reduce-overhead: CUDA graphs; off on a CPU) "
        "| true | false",
    )
    max_batch: int = option(
        0, "sequences decoded at once; larger batches are decoded in chunks of this (0 = all at once)"
    )
    # it shrinks to the next power of two, so a compiled step sees at most log2(batch) shapes
    compact_below: float = option(
        0.5, "drop finished rows from the decode batch once no more than this share of it is still running (0 = never)"
    )
    pack: str = option(
        "auto",
        "the eager static step on weights prepacked for oneDNN, q/k/v and gate/up fused (models.packed): auto (on "
        "a CPU when the projections are plain nn.Linear and the step is not compiled) | true (an error where it "
        "cannot) | false (the model's own modules)",
    )
    # each look is a host-device sync on a GPU, which stalls the queue of launched steps; the draws are the same
    # whatever it is: steps after the last row stopped are decoded and discarded
    stop_check_every: int = option(
        0,
        "decode steps between looks at which rows have finished (to stop, or to compact); "
        "0 = auto: 1 on a CPU, 8 on a GPU",
    )

    def __post_init__(self) -> None:
        # YAML reads `true` / `false` as booleans, and a str field then holds "True": one spelling for every reader
        self.compile, self.pack = str(self.compile).lower(), str(self.pack).lower()


CACHES = ("static", "dynamic")
COMPILE = ("auto", "true", "false")
PACK = ("auto", "true", "false")


def check_rollout(cfg: RolloutConfig) -> None:
    """Errors that name the valid choices, for `algo.rollout.*`."""
    check_choice("algo.rollout.cache", cfg.cache, CACHES)
    check_choice("algo.rollout.compile", cfg.compile, COMPILE)
    check_choice("algo.rollout.pack", cfg.pack, PACK)
    if cfg.pack == "true" and cfg.compile == "true":
        raise ConfigError("algo.rollout.pack=true runs the decode step eager: set algo.rollout.compile=false or auto")
    check_range("algo.rollout.max_batch", cfg.max_batch, low=0)
    check_range("algo.rollout.compact_below", cfg.compact_below, low=0.0, high=1.0)
    check_range("algo.rollout.stop_check_every", cfg.stop_check_every, low=0)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def draw_uniforms(
    prompts: int,
    group_size: int,
    steps: int,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
) -> Tensor:
    """The sampling noise of a whole rollout, [P * G, steps]: one uniform per sample and step.

    With one generator per prompt (a list of P) each group's noise comes from its own generator, so a
    sample does not depend on which other prompts share its batch, rank or decode chunk. Drawn before
    decoding, so neither chunking nor compaction (which change who is decoded together) can change it.
    """
    if isinstance(generator, list):
        return torch.cat([torch.rand(group_size, steps, generator=g, device=device) for g in generator])
    return torch.rand(prompts * group_size, steps, generator=generator, device=device)


def compile_mode(cfg: RolloutConfig, model: torch.nn.Module) -> str | None:
    """The torch.compile mode of the static decode step, None for eager."""
    device = next(model.parameters()).device.type
    if cfg.compile == "false" or (cfg.compile == "auto" and (device != "cuda" or is_sharded(model))):
        # a sharded model's gathered weights are new tensors every rollout: a compiled step would recompile
        return None
    return "reduce-overhead" if device == "cuda" else "default"


# compiled decoders, one per model and mode, kept for the model's lifetime (compiling is the expensive part)
_compiled: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, StaticDecoder]] = weakref.WeakKeyDictionary()


def stop_check_every(cfg: RolloutConfig, model: torch.nn.Module) -> int:
    if cfg.stop_check_every > 0:
        return cfg.stop_check_every
    return 1 if next(model.parameters()).device.type == "cpu" else 8


def pack_weights(cfg: RolloutConfig, model: torch.nn.Module, mode: str | None) -> bool:
    """Whether the eager static step runs on packed weights (models.packed)."""
    if cfg.pack == "false":
        return False
    why_not = (
        "the decode step is compiled"
        if mode is not None
        else "the model is sharded"
        if is_sharded(model)
        else packable(model)
    )
    if why_not and cfg.pack == "true":
        raise ConfigError(f"algo.rollout.pack=true, but {why_not}: set algo.rollout.pack=auto or false")
    return why_not is None


def static_decoder(model: torch.nn.Module, mode: str | None, pack_rows: int = 0) -> StaticDecoder:
    if mode is None:
        return StaticDecoder(model, pack_rows=pack_rows)
    per_mode = _compiled.setdefault(model, {})
    if mode not in per_mode:
        per_mode[mode] = StaticDecoder(model, mode)
    return per_mode[mode]


def _bucket(alive: int) -> int:
    # the next power of two >= alive, and at least 2: a compiled step takes one row as a size of its own (dynamo
    # specializes sizes 0 and 1), which would be a second compile
    return max(1 << max(alive - 1, 0).bit_length(), 2)


@torch.inference_mode()
def _decode_static(
    decoder: StaticDecoder,
    prompt_ids: Tensor,  # [U, Tp] the distinct prompts of this chunk, left-padded
    prompt_mask: Tensor,  # [U, Tp]
    rows: Tensor,  # [n] the prompt (index into U) of each sequence
    uniform: Tensor,  # [n, max_new_tokens]
    stop_ids: Tensor,  # [S]
    pad_id: int,
    temperature: float,
    top_p: float,
    compact_below: float,
    stop_check_every: int,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    n, max_new = uniform.shape
    tp = prompt_ids.shape[1]
    cache = decoder.new_cache(n, tp + max_new)
    logits = decoder.prefill(cache, prompt_ids, prompt_mask, rows)  # [n, V]
    token, logp = sample_token(logits, uniform[:, 0], temperature, top_p)
    position = prompt_mask.sum(-1)[rows]  # [n]: left padding shifts positions
    tokens = torch.full((n, max_new), pad_id, dtype=torch.long, device=uniform.device)
    logps = torch.zeros(n, max_new, dtype=torch.float32, device=uniform.device)
    live = torch.arange(n, device=uniform.device)  # the sequence of each row of the decode batch
    finished = torch.zeros(n, dtype=torch.bool, device=uniform.device)
    used = torch.zeros(max_new, dtype=torch.bool, device=uniform.device)  # [max_new]: a row still ran at step t
    slots = torch.arange(tp, tp + max_new, device=uniform.device)  # step t's cache slot, already on the device
    for t in tqdm(range(max_new), desc="generate", leave=False, disable=not progress):
        used[t] = ~finished.all()
        token = torch.where(finished, pad_id, token)
        tokens[live, t] = token
        logps[live, t] = torch.where(finished, 0.0, logp.float())
        finished = finished | torch.isin(token, stop_ids)
        if t == max_new - 1:
            break
        if (t + 1) % stop_check_every == 0:  # the host reads the device: on a GPU, a sync
            running = int((~finished).sum())
            if running == 0:
                break
            if running <= compact_below * len(live) and _bucket(running) < len(live):
                # keep the running rows, topped up with finished ones to a power of two; the extra rows decode
                # on unseen (their outputs are not written: they stay finished)
                order = torch.argsort(finished.to(torch.int8), stable=True)[: _bucket(running)]
                cache, live, finished = cache.compact(order), live[order], finished[order]
                token, position = token[order], position[order]
        token, logp = decoder.step(cache, token, position, slots[t], uniform[live, t + 1], temperature, top_p)
        position = position + 1
    steps = int(used.sum())  # steps after the last row stopped (between two checks) wrote nothing
    return tokens[:, :steps], logps[:, :steps]


@torch.inference_mode()
def _decode_dynamic(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    rows: Tensor,
    uniform: Tensor,
    stop_ids: Tensor,
    pad_id: int,
    temperature: float,
    top_p: float,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """The model's own forward over a growing DynamicCache: any architecture, and the static path's reference."""
    cache = DynamicCache()
    positions = position_ids(prompt_mask)
    # the prefill runs once per distinct prompt, and only the last position becomes logits
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        **with_cache(cache),
        logits_to_keep=1,
    )
    cache.batch_select_indices(rows)  # the prompt's cache copied to each of its samples
    logits = out.logits[rows, -1]  # [n, V]
    mask = prompt_mask[rows]  # [n, Tp]
    next_pos = positions[rows, -1:] + 1  # [n, 1]
    n, max_new = uniform.shape
    finished = torch.zeros(n, dtype=torch.bool, device=prompt_ids.device)
    tokens, logps = [], []
    for t in tqdm(range(max_new), desc="generate", leave=False, disable=not progress):
        token, logp = sample_token(logits, uniform[:, t], temperature, top_p)
        token = torch.where(finished, pad_id, token)
        logps.append(torch.where(finished, 0.0, logp))
        tokens.append(token)
        finished = finished | torch.isin(token, stop_ids)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, **with_cache(cache))
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


def _chunks(n: int, max_batch: int) -> list[slice]:
    size = n if max_batch <= 0 else max_batch
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def pad_to(x: Tensor, width: int, value: float, left: bool = False) -> Tensor:
    """x [N, T] padded with `value` to [N, width], on the right (completions) or the left (prompts)."""
    extra = width - x.shape[1]
    return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)


def sample_completions(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    group_size: int,
    uniform: Tensor,
    stop_ids: Tensor,
    pad_id: int,
    temperature: float,
    top_p: float,
    cfg: RolloutConfig,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """G completions of each distinct prompt [P, Tp]: (ids [N, Tc], mask [N, Tc], logp [N, Tc]), N = P * G.

    Decoded in chunks of at most cfg.max_batch sequences; uniform [N, max_new_tokens] is the noise of every
    sample and step, so the draws do not depend on the chunking.
    """
    chunks = _chunks(prompt_ids.shape[0] * group_size, cfg.max_batch)
    static = cfg.cache == "static" and supports_static_cache(model)
    decoder, check_every = None, stop_check_every(cfg, model)
    if static:
        mode = compile_mode(cfg, model)
        pack_rows = chunks[0].stop - chunks[0].start  # the decode batch the pack is laid out for
        decoder = static_decoder(model, mode, pack_rows if pack_weights(cfg, model, mode) else 0)
    ids, logps = [], []
    for chunk in chunks:
        first, last = chunk.start // group_size, (chunk.stop - 1) // group_size
        rows = torch.arange(chunk.start, chunk.stop, device=prompt_ids.device) // group_size - first
        chunk_ids, chunk_mask = prompt_ids[first : last + 1], prompt_mask[first : last + 1]
        keep = chunk_mask.any(0)  # drop the left-padding columns no prompt of this chunk needs
        chunk_ids, chunk_mask = chunk_ids[:, keep], chunk_mask[:, keep]
        if decoder is not None:  # cache=static on a model that supports it
            out = _decode_static(
                decoder,
                chunk_ids,
                chunk_mask,
                rows,
                uniform[chunk],
                stop_ids,
                pad_id,
                temperature,
                top_p,
                cfg.compact_below,
                check_every,
                progress,
            )
        else:
            out = _decode_dynamic(
                model, chunk_ids, chunk_mask, rows, uniform[chunk], stop_ids, pad_id, temperature, top_p, progress
            )
        ids.append(out[0])
        logps.append(out[1])
    width = max(x.shape[1] for x in ids)
    completion_ids = torch.cat([pad_to(x, width, pad_id) for x in ids])  # [N, Tc]
    logp = torch.cat([pad_to(x, width, 0.0) for x in logps])  # [N, Tc]
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
    rollout: RolloutConfig | None = None,
) -> Rollout:
    """Sample `group_size` completions for each row's "prompt"; returns a group-contiguous Rollout.

    prompt_seeds: one seed per row; each prompt's samples then come from its own generator (and
    `generator` is not used), independent of the batch they are drawn in. A model sharded over ranks
    samples on its gathered weights (parallel.fsdp.sampling_weights), with no collective per token.
    rollout: how to decode (RolloutConfig's defaults when None); it does not change what is drawn.
    """
    device = next(model.parameters()).device
    noise: torch.Generator | list[torch.Generator] | None = generator  # what draws the sampling noise
    if prompt_seeds is not None:
        if len(prompt_seeds) != len(rows):
            raise ValueError(f"{len(prompt_seeds)} prompt seeds for {len(rows)} prompts")
        noise = [torch.Generator(device=device).manual_seed(int(s)) for s in prompt_seeds]
    elif generator is not None and generator.device.type != device.type:
        # a CPU generator cannot drive sampling on a GPU: seed a generator there from it, deterministically
        seed = int(torch.randint(2**62, (1,), generator=generator))
        noise = torch.Generator(device=device).manual_seed(seed)
    prompts = [row["prompt"] for row in rows for _ in range(group_size)]
    sample_rows = [row for row in rows for _ in range(group_size)]
    enc = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    unique_ids, unique_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # [P, Tp]
    stop_ids = torch.tensor(stop_token_ids(tokenizer, model), device=device)
    was_training = model.training
    model.eval()
    # a sharded model samples on gathered weights: ranks stop at different steps (parallel.fsdp)
    uniform = draw_uniforms(len(rows), group_size, max_new_tokens, noise, device)  # [N, max_new_tokens]
    with sampling_weights(model):
        completion_ids, completion_mask, logp = sample_completions(
            model,
            unique_ids,
            unique_mask,
            group_size,
            uniform,
            stop_ids,
            tokenizer.pad_token_id,
            temperature,
            top_p,
            rollout or RolloutConfig(),
            progress,
        )
    prompt_ids = unique_ids.repeat_interleave(group_size, dim=0)  # [N, Tp]
    prompt_mask = unique_mask.repeat_interleave(group_size, dim=0)
    model.train(was_training)
    truncated = ~torch.isin(completion_ids, stop_ids).any(-1)
    texts = tokenizer.batch_decode(
        completion_ids * completion_mask + tokenizer.pad_token_id * (1 - completion_mask), skip_special_tokens=True
    )
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logp=logp,
        truncated=truncated,
        prompts=prompts,
        completions=texts,
        rows=sample_rows,
    )
