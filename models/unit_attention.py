"""Attention of a packed row computed unit by unit: only the pairs the packed mask keeps.

A packed row (models.padding_free) holds units laid end to end, each a prompt and the completions that share it.
Its `[R, 1, L, L]` mask keeps, for a completion token, the unit's prompt and the earlier tokens of its own
completion: SDPA with that dense mask still computes every pair of the row (on a CPU the kernel does not skip
masked blocks), and with G completions after one prompt most pairs are masked. Here each piece runs on its own:

    prompt tokens:     causal over the prompt                        SDPA(q_P, k_P, v_P, causal)
    completion i:      the prompt, then causal over its own tokens   SDPA(q_i, [k_P; k_i], [v_P; v_i], mask)

so the work is sum_i c_i (P + c_i) per unit instead of L^2 per row, and every softmax sums the same terms as the
dense-mask pass (equal up to float rounding; row-end padding gets zeros, which nothing reads).

Registered with transformers as the attention implementation `unit_sdpa`: with no `packed_units` argument it is
transformers' own SDPA attention (masks built as for sdpa), so a model switched to it generates and runs padded
passes exactly as before; `models.padding_free.packed_hidden` switches an sdpa model to it and passes the row's
units with each decoder call (a keyword argument reaches every layer, and activation checkpointing's recompute
gets it again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["UNIT_SDPA", "RowUnits", "unit_attention"]

UNIT_SDPA = "unit_sdpa"

# one row's units: (prompt start, prompt length, [(completion start, completion length), ...]), in row order
RowUnits = list[tuple[int, int, list[tuple[int, int]]]]


def _row(query: Tensor, key: Tensor, value: Tensor, units: RowUnits, scaling: float | None, dropout: float) -> Tensor:
    """[h, L, d] attention output of one row (query, key, value: [h, L, d], kv heads already repeated)."""
    pieces, end = [], 0  # the pieces lie end to end from position 0 (models.padding_free.pack)
    for p0, p, completions in units:
        k_p, v_p = key[:, p0 : p0 + p], value[:, p0 : p0 + p]
        if p:
            pieces.append(
                F.scaled_dot_product_attention(
                    query[:, p0 : p0 + p], k_p, v_p, is_causal=True, scale=scaling, dropout_p=dropout
                )
            )
        end = p0 + p
        for c0, c in completions:
            # query j of the completion sees the whole prompt and its own tokens 0..j: key k <= p + j
            mask = torch.ones(c, p + c, dtype=torch.bool, device=query.device).tril(diagonal=p)
            pieces.append(
                F.scaled_dot_product_attention(
                    query[:, c0 : c0 + c],
                    torch.cat([k_p, key[:, c0 : c0 + c]], dim=1),
                    torch.cat([v_p, value[:, c0 : c0 + c]], dim=1),
                    attn_mask=mask,
                    scale=scaling,
                    dropout_p=dropout,
                )
            )
            end = c0 + c
    L = query.shape[1]
    if end < L:  # row-end padding
        pieces.append(query.new_zeros(query.shape[0], L - end, query.shape[2]))
    return torch.cat(pieces, dim=1)


def unit_attention(
    module: torch.nn.Module,
    query: Tensor,  # [R, h, L, d]
    key: Tensor,  # [R, kv_h, L, d]
    value: Tensor,  # [R, kv_h, L, d]
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_units: list[RowUnits] | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature; returns ([R, L, h, d], None). Without `packed_units`,
    transformers' SDPA attention."""
    if packed_units is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    repeat = query.shape[1] // key.shape[1]  # grouped-query attention: each kv head serves `repeat` query heads
    key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    rows = [_row(query[r], key[r], value[r], units, scaling, dropout) for r, units in enumerate(packed_units)]
    return torch.stack(rows).transpose(1, 2), None


AttentionInterface.register(UNIT_SDPA, unit_attention)
AttentionMaskInterface.register(UNIT_SDPA, sdpa_mask)
