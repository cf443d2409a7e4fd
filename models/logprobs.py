"""Log-probabilities of chosen tokens: the hot path of every RL step.

`token_logprobs` never materialises a full log_softmax copy of the logits: it takes a logsumexp
and a gather per chunk of rows, so the only [*, V] tensors alive are the logits themselves (and one
chunk's temporaries).
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_logprobs(
    logits: Tensor,  # [B, T, V]
    tokens: Tensor,  # [B, T] long
    temperature: float = 1.0,
    chunk_rows: int = 1024,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / temperature)[tokens] per position, accumulated in fp32.

    Returns (logp [B, T] fp32, entropy [B, T] fp32 or None). Entropy is of the same
    temperature-scaled distribution, H = logsumexp(z) - sum softmax(z) * z; it carries no gradient
    unless entropy_grad (an entropy bonus in the loss), which keeps one [rows, V] softmax per chunk
    alive for backward.
    """
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    flat_tokens = tokens.reshape(B * T, 1)
    logp_chunks, ent_chunks = [], []
    for start in range(0, B * T, chunk_rows):
        z = flat[start : start + chunk_rows].float()  # a no-op view for fp32 logits
        if temperature != 1.0:
            z = z / temperature
        lse = torch.logsumexp(z, dim=-1)  # [c]
        logp_chunks.append(z.gather(-1, flat_tokens[start : start + chunk_rows]).squeeze(-1) - lse)
        if with_entropy:  # by default a diagnostic: no graph is kept for it
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent_chunks.append(lse - (torch.softmax(z, dim=-1) * z).sum(-1))
    logp = torch.cat(logp_chunks).view(B, T)
    entropy = torch.cat(ent_chunks).view(B, T) if with_entropy else None
    return logp, entropy


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,  # [B, Tp + Tc] prompt (left-padded) then completion
    attention_mask: Tensor,  # [B, Tp + Tc]
    completion_len: int,  # Tc
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the completion tokens under `model`: (logp [B, Tc], entropy [B, Tc] | None).

    Runs the decoder once and sends only the Tc positions that predict completion tokens through
    lm_head: prompt positions never become [*, V] logits.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding shifts positions
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state  # [B, Tp + Tc, H]
    hidden = hidden[:, -completion_len - 1 : -1]  # position t predicts token t + 1
    logits = model.get_output_embeddings()(hidden)  # [B, Tc, V]
    return token_logprobs(logits, input_ids[:, -completion_len:], temperature, with_entropy=with_entropy,
                          entropy_grad=entropy_grad)
