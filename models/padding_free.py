"""Padding-free passes: the real tokens of a batch laid end to end in rows of at most a token budget.

The padded layout runs `[B, Tp + Tc]`: every prompt left-padded to the longest prompt, every completion
right-padded to the longest completion. With long, uneven completions (reasoning that stops at EOS after 80
tokens beside one that runs to 1,000) most of those positions are padding. Here the same sequences run as
units laid end to end:

    row:  [prompt A][completion A1][completion A2]...[prompt B][completion B1]...[pad]

A unit is one prompt and the completions that share it (GRPO's group, or the part of it in this batch), so a
prompt runs once for its G completions, as the shared prefill of `models.forward` does. Each token gets the
position it has in its own sequence (prompt 0 .. P-1, completion P ..), and a `[R, 1, L, L]` mask lets it
attend to earlier tokens of its own completion and of its prompt only: the hidden states equal the padded
pass's up to float rounding (the softmax sums the same terms, without the masked-out zeros). Padding at a row's
end attends to itself, so that no softmax row is empty (an empty one is NaN, and 0 * NaN in the backward).

The same units decide the micro-batches (`balanced_micro_batches`): sequences grouped so that each
micro-batch's tokens, prompts counted once, stay within the budget, in as few micro-batches as the assignment
finds (`assign_bins`: longest first into the lightest micro-batch, or first-fit decreasing where balancing would
need one more).

SDPA runs the layout unit by unit (models.unit_attention: a prompt over itself, each completion over its prompt
and itself), so no masked pair is computed; eager attention takes the dense mask (its cost grows with the square
of the row length, so the budget also bounds the wasted work across units). Flash attention's varlen kernels and
FlexAttention take sequence bounds from position ids instead (`packed_hidden(by_positions=...)`): every
sequence laid out whole, no mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from models.unit_attention import UNIT_SDPA, RowUnits


@dataclass
class Unit:
    """One prompt and the completions that share it: indices into the batch, its tokens with the prompt once."""

    prompt: int  # the sequence whose prompt tokens the unit runs
    members: list[int]  # sequences whose completions follow it, in order
    tokens: int  # real prompt tokens + real completion tokens of the members


def build_units(
    prompt_keys: list[int],  # [B] sequences with the same key share their prompt (distinct keys: no sharing)
    prompt_lens: list[int],  # [B] real prompt tokens
    completion_lens: list[int],  # [B] real completion tokens
    budget: int,
) -> list[Unit]:
    """Sequences grouped by prompt, each group split where prompt + completions would pass `budget` (the
    next part repeats the prompt). A single sequence longer than the budget is a unit of its own."""
    groups: dict[int, list[int]] = {}
    for b, key in enumerate(prompt_keys):
        groups.setdefault(key, []).append(b)
    units: list[Unit] = []
    for members in groups.values():
        p = prompt_lens[members[0]]
        current: list[int] = []
        tokens = p
        for b in members:
            if current and tokens + completion_lens[b] > budget:
                units.append(Unit(current[0], current, tokens))
                current, tokens = [], p
            current.append(b)
            tokens += completion_lens[b]
        units.append(Unit(current[0], current, tokens))
    return units


def assign_bins(costs: list[int], budget: int) -> list[list[int]]:
    """Items (by cost) in as few bins of at most `budget` as the assignment finds, starting from
    ceil(total / budget) bins: longest first into the lightest bin (balanced loads), else longest first into the
    first bin it fits (first-fit decreasing: fuller bins, where balancing would need one bin more). An item over
    the budget gets a bin of its own. Returns each bin's item indices, sorted, in order of their first item."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    bins = [[i] for i in order if costs[i] > budget]
    rest = [i for i in order if costs[i] <= budget]
    k = max(1, -(-sum(costs[i] for i in rest) // budget))
    while rest:
        fitted = _longest_first(rest, costs, budget, k, lightest=True) or _longest_first(rest, costs, budget, k)
        if fitted is not None:
            bins += [b for b in fitted if b]
            break
        k += 1
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def _longest_first(
    order: list[int], costs: list[int], budget: int, k: int, lightest: bool = False
) -> list[list[int]] | None:
    """Each item (longest first) into the lightest of k bins, or the first it fits; None when one does not fit."""
    loads: list[int] = [0] * k
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in order:
        if lightest:
            j = min(range(k), key=lambda j: (loads[j], j))
        else:
            j = next((j for j in range(k) if loads[j] + costs[i] <= budget), 0)
        if loads[j] + costs[i] > budget:
            return None
        loads[j] += costs[i]
        bins[j].append(i)
    return bins


def prompt_keys(input_ids: Tensor, attention_mask: Tensor, prompt_len: int, share: bool) -> list[int]:
    """[B] a key per sequence, equal for sequences whose prompt (ids and mask, the first `prompt_len` columns)
    is identical when `share`; distinct otherwise."""
    if not share or prompt_len == 0:
        return list(range(input_ids.shape[0]))
    key = torch.cat([input_ids[:, :prompt_len], attention_mask[:, :prompt_len].to(input_ids.dtype)], dim=1)
    return torch.unique(key, dim=0, return_inverse=True)[1].tolist()


def sequence_lengths(attention_mask: Tensor, prompt_len: int) -> tuple[list[int], list[int]]:
    """(real prompt tokens [B], real completion tokens [B]) of a `[B, Tp + Tc]` mask split at `prompt_len`."""
    return attention_mask[:, :prompt_len].sum(1).tolist(), attention_mask[:, prompt_len:].sum(1).tolist()


def balanced_micro_batches(
    input_ids: Tensor,  # [B, Tp + Tc]
    attention_mask: Tensor,  # [B, Tp + Tc]
    prompt_len: int,  # Tp
    budget: int,  # real tokens per micro-batch, a prompt counted once for the completions that share it
    share_prompts: bool = True,
) -> list[Tensor]:
    """The batch's sequences as micro-batches (index tensors) of at most `budget` tokens, as few as the
    assignment finds, balanced. The units of `build_units` stay whole, so a shared prompt runs once."""
    prompt_lens, completion_lens = sequence_lengths(attention_mask, prompt_len)
    keys = prompt_keys(input_ids, attention_mask, prompt_len, share_prompts)
    units = build_units(keys, prompt_lens, completion_lens, budget)
    bins = assign_bins([u.tokens for u in units], budget)
    return [torch.tensor(sorted(b for u in bin_ for b in units[u].members), dtype=torch.long) for bin_ in bins]


# (this rank's number of micro-batches) -> the number every rank runs; None: each process decides alone
CountAgreement = Callable[[int], int]
_count_agreement: dict[str, CountAgreement | None] = {"agree": None}


def set_micro_batch_agreement(agree: CountAgreement | None) -> None:
    """How the ranks agree on the number of micro-batches a token budget cuts a minibatch into: under FSDP every
    forward and backward runs collectives, so every rank must run as many (parallel.fsdp registers the max)."""
    _count_agreement["agree"] = agree


def split_to(parts: list[Tensor], count: int) -> list[Tensor]:
    """`parts` cut into `count` micro-batches by halving the one with most sequences, as often as needed."""
    parts = list(parts)
    while len(parts) < count:
        largest = max(range(len(parts)), key=lambda i: len(parts[i]))
        if len(parts[largest]) < 2:
            raise RuntimeError(
                f"the ranks run {count} micro-batches, but this rank holds {len(parts)} sequences: give every rank "
                "more sequences per minibatch, or a token budget that cuts the ranks' minibatches alike"
            )
        part = parts.pop(largest)
        half = len(part) // 2
        parts[largest:largest] = [part[:half], part[half:]]
    return parts


def agreed_count(parts: list[Tensor]) -> list[Tensor]:
    """`parts` cut into as many micro-batches as every rank runs (`set_micro_batch_agreement`); as they are alone."""
    agree = _count_agreement["agree"]
    return parts if agree is None else split_to(parts, agree(len(parts)))


@dataclass
class PackedLayout:
    """Where every real token of a padded `[B, T]` batch sits in `[R, L]` packed rows."""

    input_ids: Tensor  # [R, L]
    position_ids: Tensor  # [R, L] each token's position in its own sequence
    segment: Tensor  # [R, L] unit id of each position (-1 on padding)
    sequence: Tensor  # [R, L] sequence id of completion tokens; -1 on prompt tokens and padding
    source: Tensor  # [B * T] flat packed index (r * L + l) of every padded position; -1 on padding
    forwarded: int  # R * L
    real: int  # real tokens run (prompts once per unit)
    prompt_repeats_avoided: int  # real prompt tokens the sharing did not run again
    # per row, its units in order: (prompt start, prompt length, [(completion start, length), ...])
    units: list[RowUnits]

    def mask(self) -> Tensor:
        """[R, 1, L, L] bool, True where query l may attend to key m: same unit, m <= l, and m a prompt token
        or a token of l's own completion; every padding position attends to itself."""
        seg, seq = self.segment, self.sequence
        L = seg.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
        same_unit = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
        visible = (seq[:, None, :] < 0) | (seq[:, :, None] == seq[:, None, :])
        own = torch.eye(L, dtype=torch.bool, device=seg.device)[None] & (seg < 0)[:, :, None]
        return ((same_unit & visible & causal) | own)[:, None]


def pack(
    input_ids: Tensor,  # [B, Tp + Tc] prompt left-padded, completion right-padded
    attention_mask: Tensor,  # [B, Tp + Tc]
    prompt_len: int,  # Tp; 0: whole sequences (left-padded), no prompt to share
    budget: int,  # tokens per row (a unit longer than it gets a row of its own)
    share_prompts: bool = True,
    pad_id: int = 0,
) -> PackedLayout:
    """The packed layout of a padded batch (see the module's docstring)."""
    B, T = input_ids.shape
    device = input_ids.device
    prompt_lens, completion_lens = sequence_lengths(attention_mask, prompt_len)
    keys = prompt_keys(input_ids, attention_mask, prompt_len, share_prompts)
    units = build_units(keys, prompt_lens, completion_lens, budget)
    rows = assign_bins([u.tokens for u in units], budget)
    L = max(sum(units[u].tokens for u in row) for row in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=input_ids.dtype, device=device)
    positions = torch.zeros(len(rows), L, dtype=torch.long, device=device)
    segment = torch.full((len(rows), L), -1, dtype=torch.long, device=device)
    sequence = torch.full((len(rows), L), -1, dtype=torch.long, device=device)
    source = torch.full((B * T,), -1, dtype=torch.long, device=device)
    row_units: list[RowUnits] = [[] for _ in rows]
    real_cols = [attention_mask[b].nonzero().squeeze(1) for b in range(B)]  # [P_b + C_b] each
    for r, row in enumerate(rows):
        at = 0
        for u in row:
            unit = units[u]
            p = prompt_lens[unit.prompt]
            prompt_cols = real_cols[unit.prompt][:p]
            ids[r, at : at + p] = input_ids[unit.prompt, prompt_cols]
            positions[r, at : at + p] = torch.arange(p, device=device)
            segment[r, at : at + p] = u
            flat = r * L + at + torch.arange(p, device=device)
            for b in unit.members:  # every member reads the unit's prompt states at its own prompt columns
                source[b * T + real_cols[b][:p]] = flat
            spans: list[tuple[int, int]] = []
            row_units[r].append((at, p, spans))
            at += p
            for b in unit.members:
                c = completion_lens[b]
                cols = real_cols[b][p : p + c]
                ids[r, at : at + c] = input_ids[b, cols]
                positions[r, at : at + c] = torch.arange(p, p + c, device=device)
                segment[r, at : at + c] = u
                sequence[r, at : at + c] = b
                source[b * T + cols] = r * L + at + torch.arange(c, device=device)
                spans.append((at, c))
                at += c
    real = sum(u.tokens for u in units)
    return PackedLayout(
        input_ids=ids,
        position_ids=positions,
        segment=segment,
        sequence=sequence,
        source=source,
        forwarded=len(rows) * L,
        real=real,
        prompt_repeats_avoided=sum(prompt_lens) + sum(completion_lens) - real,
        units=row_units,
    )


def unpack(hidden: Tensor, layout: PackedLayout, B: int, T: int) -> Tensor:
    """Packed hidden states [R, L, H] back on the padded grid [B, T, H]; 0 on padding. Differentiable (a
    position shared by several sequences, a unit's prompt, gathers its gradient from each)."""
    R, L, H = hidden.shape
    real = (layout.source >= 0).nonzero().squeeze(1)  # [N] flat padded positions holding real tokens
    states = hidden.reshape(R * L, H).index_select(0, layout.source[real])
    return hidden.new_zeros(B * T, H).index_copy(0, real, states).view(B, T, H)


MASKED = ("sdpa", "eager")  # attention that runs the layout's units (sdpa: unit_sdpa) or takes its mask (eager)
BY_POSITIONS = ("flash_attention_2", "flash_attention_3", "flex_attention")  # sequence bounds from position ids


def attention_of(decoder: torch.nn.Module) -> str:
    """The decoder's attention implementation (sdpa when it does not say)."""
    return getattr(getattr(decoder, "config", None), "_attn_implementation", None) or "sdpa"


def attention_mask_for(impl: str, layout: PackedLayout, dtype: torch.dtype) -> Tensor:
    """The layout's mask in the form the model's attention takes: bool for SDPA, additive for eager."""
    mask = layout.mask()
    if impl == "sdpa":
        return mask
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"packed passes run on attn_implementation {' | '.join(MASKED + BY_POSITIONS)}, not {impl!r}: load the "
        "model with one of them, or set the token budget to 0 (the padded path)"
    )


def packed_hidden(
    decoder: torch.nn.Module,  # a causal LM's decoder (embeddings + blocks, no lm_head)
    input_ids: Tensor,  # [B, Tp + Tc]
    attention_mask: Tensor,  # [B, Tp + Tc]
    prompt_len: int,  # Tp; 0 for whole sequences with nothing to share
    budget: int,
    share_prompts: bool = True,
    by_positions: bool | None = None,  # None: as the decoder's attention needs (BY_POSITIONS)
    dense_mask: bool = False,  # sdpa: the layout's [R, 1, L, L] mask rather than unit by unit (a benchmark's baseline)
) -> tuple[Tensor, PackedLayout]:
    """Last hidden states on the padded grid [B, Tp + Tc, H] (0 on padding) from one packed pass, and its layout.

    A unit's prompt runs once for its completions. An sdpa decoder is switched to `unit_sdpa`
    (models.unit_attention: each prompt and each completion attends over its own keys only, the pairs the mask
    would drop never computed; the same as sdpa on every other pass); eager attention takes the layout's mask.
    Flash attention's varlen kernels (and FlexAttention's block mask) take sequence bounds instead, which
    transformers reads from position ids that restart at 0 (`by_positions`): then every sequence is laid out
    whole, its prompt with it, and no mask is passed; a flash kernel then skips the pairs across sequences.
    """
    B, T = input_ids.shape
    impl = attention_of(decoder)
    if by_positions is None:
        by_positions = impl in BY_POSITIONS
    layout = pack(input_ids, attention_mask, prompt_len, budget, share_prompts and not by_positions)
    dtype = next(decoder.parameters()).dtype
    units: dict[str, list[RowUnits]] = {}
    if by_positions:
        mask = None
    elif impl in ("sdpa", UNIT_SDPA) and not dense_mask:
        config: Any = decoder.config
        config._attn_implementation = UNIT_SDPA  # sdpa itself wherever no units are passed
        mask, units = None, {"packed_units": layout.units}
    else:
        mask = attention_mask_for("sdpa" if impl == UNIT_SDPA else impl, layout, dtype)
    hidden = decoder(
        input_ids=layout.input_ids,
        attention_mask=mask,
        position_ids=layout.position_ids,
        use_cache=False,
        **units,
    ).last_hidden_state  # [R, L, H]
    return unpack(hidden, layout, B, T), layout
