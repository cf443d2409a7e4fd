"""Log-probabilities of chosen tokens: the hot path of every RL step (policy, old policy, reference).

Three ways to the same numbers, log softmax(logits / temperature)[token] accumulated in fp32:
- `token_logprobs(logits, tokens)`: from given logits, a chunk of rows at a time, without the
  [*, V] log_softmax copy that `log_softmax(...).gather(...)` makes, and with a hand-written backward
  that writes the gradient of each chunk straight into one [*, V] buffer.
- `fused_token_logprobs(hidden, lm_head_weight, tokens)`: lm_head and the log-probs in one custom
  autograd Function that never holds the [B, T, V] logits: each chunk of rows is projected, reduced
  to (logsumexp, chosen logit) and dropped; backward recomputes each chunk's logits. The price is
  one more [chunk, H] x [H, V] matmul per chunk in backward; the gain is memory (and no page-faulting
  of [B, T, V] buffers).
- the same Function with the per-row reductions done by Triton kernels (`models/triton_logprobs.py`),
  chosen automatically for CUDA tensors when Triton is installed.
When the log-probs feed a loss that is a sum over tokens, `models.fused_loss` goes one step further
and forms the loss's gradient inside the forward pass (no recompute: three matmuls, not four).
`completion_pass` is the decoder pass both run on (FSDP-aware).

Entropy H = logsumexp(z) - sum softmax(z) * z of the same tempered distribution comes from the same
pass. Its gradient is p * (E_p[z] - z), so it costs one saved number per row, not a [rows, V] softmax.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from models.forward import CausalLM, completion_hidden

BACKENDS = ("auto", "torch", "triton")
CHUNK_BYTES = 32 * 2**20  # one fp32 [chunk, V] block of logits on a CPU: 32 MiB (170 rows at V = 49152)
# on a GPU: 512 MiB (1046 rows at V = 128256). Each chunk's [rows, H] x [H, V] matmul reads all of lm_head
# (1 GiB for the 8B model): at 65 rows (32 MiB) that read dominates, at ~1000 rows the matmul is compute-bound
CUDA_CHUNK_BYTES = 512 * 2**20


def chunk_budget(device: torch.device | str | None) -> int:
    """Bytes of one fp32 [chunk, V] block: CHUNK_BYTES on a CPU; on a GPU CUDA_CHUNK_BYTES, at most 1/64 of
    its memory."""
    if device is None or torch.device(device).type != "cuda":
        return CHUNK_BYTES
    return min(CUDA_CHUNK_BYTES, torch.cuda.get_device_properties(device).total_memory // 64)


def default_chunk_rows(vocab_size: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that one fp32 [rows, V] block fits `budget_bytes` (at least 16 rows)."""
    return max(16, budget_bytes // (4 * vocab_size))


# ---------------------------------------------------------------- per-row math on one chunk (PyTorch)


def _chunk_stats(z: Tensor, tokens: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """z [c, V] fp32 tempered logits -> (lse [c], chosen-token logp [c], E_p[z] [c] | None)."""
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, tokens[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return lse, logp, None
    expected_z = torch.exp(z - lse[:, None]).mul_(z).sum(-1)  # E_p[z]; entropy = lse - E_p[z]
    return lse, logp, expected_z


def _chunk_grad_(
    x: Tensor,
    out: Tensor,
    tokens: Tensor,
    lse: Tensor,
    expected_z: Tensor | None,
    g_logp: Tensor,
    g_ent: Tensor | None,
    inv_temp: float,
) -> Tensor:
    """d(sum g_logp * logp + g_ent * entropy) / dx for untempered logits x [c, V], written into `out`
    (fp32 [c, V], which may be x itself).

    d logp / dz = onehot - p;  d entropy / dz = p * (E_p[z] - z);  dz / dx = 1 / temperature.
    """
    z_entropy = x.float() * inv_temp if g_ent is not None else None  # before `out` (maybe x) is overwritten
    p = torch.add(-lse[:, None], x, alpha=inv_temp, out=out).exp_()  # z - lse in one pass, then p in place
    if g_ent is None:
        p.mul_((-g_logp * inv_temp)[:, None])
    else:
        assert z_entropy is not None and expected_z is not None  # an entropy gradient comes with E_p[z]
        p.mul_(z_entropy.sub_(expected_z[:, None]).mul_(-g_ent[:, None]).sub_(g_logp[:, None])).mul_(inv_temp)
    return p.scatter_add_(-1, tokens[:, None], (g_logp * inv_temp)[:, None])


def _tempered_fp32(logits: Tensor, inv_temp: float, writable: bool) -> Tensor:
    """fp32 logits / temperature, never writing into `logits` unless `writable` (it is then a scratch buffer)."""
    z = logits.float()  # the same tensor for fp32 logits, a fresh copy otherwise
    if inv_temp == 1.0:
        return z
    return z.mul_(inv_temp) if writable or z is not logits else z * inv_temp


def pick_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; choose one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError(
            "backend='triton' needs the triton package (pip install triton); backend='torch' needs nothing"
        )
    return backend


def triton_available() -> bool:
    """Whether Triton is installed (found, not imported: its kernels compile on first use)."""
    return importlib.util.find_spec("triton") is not None


def logit_stats(
    logits: Tensor, tokens: Tensor, inv_temp: float, with_entropy: bool, backend: str, writable: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One chunk's (lse [c], chosen-token logp [c], E_p[z] [c] | None) from logits [c, V] of any dtype.

    writable: `logits` is a scratch buffer the torch path may overwrite (it then does its exps in place).
    """
    if backend == "triton":
        from models.triton_logprobs import chunk_stats

        return chunk_stats(logits, tokens, inv_temp, with_entropy)
    z = _tempered_fp32(logits, inv_temp, writable)
    scratch = writable or z is not logits  # a buffer of our own (a bf16 input's fp32 copy is one too)
    if with_entropy or not scratch:
        return _chunk_stats(z, tokens, with_entropy)
    # z is scratch: max, exp in place and sum, without logsumexp's [c, V] temporaries
    chosen = z.gather(-1, tokens[:, None]).squeeze(-1)
    row_max = z.amax(-1, keepdim=True)  # [c, 1]
    lse = z.sub_(row_max).exp_().sum(-1).log_().add_(row_max.squeeze(-1))
    return lse, chosen - lse, None


def logit_grad(
    logits: Tensor,
    out: Tensor,
    tokens: Tensor,
    lse: Tensor,
    expected_z: Tensor | None,
    g_logp: Tensor,
    g_ent: Tensor | None,
    inv_temp: float,
    backend: str,
) -> Tensor:
    """The gradient w.r.t. one chunk's logits, written into `out` (which may be `logits` itself)."""
    if backend == "triton":
        from models.triton_logprobs import chunk_grad_

        return chunk_grad_(logits, out, tokens, lse, expected_z, g_logp, g_ent, inv_temp)
    scratch = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)
    _chunk_grad_(logits, scratch, tokens, lse, expected_z, g_logp, g_ent, inv_temp)
    return out if scratch is out else out.copy_(scratch)


def _upstream(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g.float().contiguous()


# ---------------------------------------------------------------- from given logits


class _ChunkedLogprobs(torch.autograd.Function):
    """logits [N, V] -> (logp [N], entropy [N]); saves the logits and two floats per row."""

    @staticmethod
    def forward(ctx, logits, tokens, chunk, inv_temp, with_entropy, backend):
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        logp, expected_z = torch.empty_like(lse), (torch.empty_like(lse) if with_entropy else None)
        for s in range(0, n, chunk):
            c_lse, c_logp, c_ez = logit_stats(
                logits[s : s + chunk], tokens[s : s + chunk], inv_temp, with_entropy, backend, writable=False
            )
            lse[s : s + chunk], logp[s : s + chunk] = c_lse, c_logp
            if with_entropy:
                assert expected_z is not None and c_ez is not None  # both exist with_entropy
                expected_z[s : s + chunk] = c_ez
        ctx.save_for_backward(logits, tokens, lse, expected_z)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        ctx.chunk, ctx.inv_temp, ctx.backend = chunk, inv_temp, backend
        entropy = lse - expected_z if expected_z is not None else None  # expected_z: only with_entropy
        if entropy is None:
            ctx.mark_non_differentiable(lse)  # a placeholder output, never used
        return logp, (entropy if with_entropy else lse)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, tokens, lse, expected_z = ctx.saved_tensors
        g_logp = _upstream(g_logp, lse)
        g_ent = None if (g_ent is None or expected_z is None) else g_ent.float().contiguous()
        grad = torch.empty_like(logits)
        c = ctx.chunk
        for s in range(0, logits.shape[0], c):
            logit_grad(
                logits[s : s + c],
                grad[s : s + c],
                tokens[s : s + c],
                lse[s : s + c],
                None if expected_z is None else expected_z[s : s + c],
                g_logp[s : s + c],
                None if g_ent is None else g_ent[s : s + c],
                ctx.inv_temp,
                ctx.backend,
            )
        return grad, None, None, None, None, None


def token_logprobs(
    logits: Tensor,  # [B, T, V] any float dtype
    tokens: Tensor,  # [B, T] long
    temperature: float = 1.0,
    chunk_rows: int | None = None,  # None: a 32 MiB fp32 [chunk, V] block (512 MiB on a GPU: chunk_budget)
    with_entropy: bool = False,
    entropy_grad: bool = False,
    mask: Tensor | None = None,  # [B, T] 1 = real token; padded positions give 0 and get no gradient
    backend: str = "torch",
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / temperature)[tokens] per position, accumulated in fp32.

    Returns (logp [B, T] fp32, entropy [B, T] fp32 or None). Entropy carries a gradient only with
    entropy_grad (an entropy bonus in the loss). The gradient w.r.t. `logits` has their dtype.
    """
    B, T, V = logits.shape
    backend = pick_backend(backend, logits.device)
    flat_tokens = tokens.reshape(B * T)
    if mask is not None:  # pad ids may be anything (-100, out of range): read a valid index there
        flat_tokens = flat_tokens.masked_fill(mask.reshape(B * T) == 0, 0)
    chunk_rows = chunk_rows or default_chunk_rows(V, chunk_budget(logits.device))
    logp, entropy = _ChunkedLogprobs.apply(
        logits.reshape(B * T, V), flat_tokens.contiguous(), chunk_rows, 1.0 / temperature, with_entropy, backend
    )
    logp, entropy = logp.view(B, T), (entropy.view(B, T) if with_entropy else None)
    if entropy is not None and not entropy_grad:
        entropy = entropy.detach()
    if mask is not None:
        logp = logp * mask
        entropy = entropy * mask if entropy is not None else None
    return logp, entropy


# ---------------------------------------------------------------- fused with lm_head


class _FusedLinearLogprobs(torch.autograd.Function):
    """hidden [R, H], weight [V, H] -> (logp [R], entropy [R]) without [R, V] logits kept for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, chunk, inv_temp, with_entropy, backend):
        r = hidden.shape[0]
        lse = torch.empty(r, dtype=torch.float32, device=hidden.device)
        logp, expected_z = torch.empty_like(lse), (torch.empty_like(lse) if with_entropy else None)
        for s in range(0, r, chunk):
            logits = hidden[s : s + chunk] @ weight.T  # [c, V]: the only vocabulary-sized tensor alive
            c_lse, c_logp, c_ez = logit_stats(
                logits, tokens[s : s + chunk], inv_temp, with_entropy, backend, writable=True
            )
            lse[s : s + chunk], logp[s : s + chunk] = c_lse, c_logp
            if with_entropy:
                assert expected_z is not None and c_ez is not None  # both exist with_entropy
                expected_z[s : s + chunk] = c_ez
            del logits
        ctx.save_for_backward(hidden, weight, tokens, lse, expected_z)
        ctx.set_materialize_grads(False)
        ctx.chunk, ctx.inv_temp, ctx.backend = chunk, inv_temp, backend
        if not with_entropy:
            ctx.mark_non_differentiable(lse)
        return logp, (lse - expected_z if expected_z is not None else lse)  # expected_z: only with_entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, tokens, lse, expected_z = ctx.saved_tensors
        g_logp = _upstream(g_logp, lse)
        g_ent = None if (g_ent is None or expected_z is None) else g_ent.float().contiguous()
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # fp32 accumulation over chunks, whatever the weight's dtype
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        c = ctx.chunk
        for s in range(0, hidden.shape[0], c):
            h = hidden[s : s + c]
            logits = h @ weight.T  # recomputed: [c, V]
            dlogits = logit_grad(
                logits,
                logits,
                tokens[s : s + c],
                lse[s : s + c],
                None if expected_z is None else expected_z[s : s + c],
                g_logp[s : s + c],
                None if g_ent is None else g_ent[s : s + c],
                ctx.inv_temp,
                ctx.backend,
            )
            if grad_hidden is not None:  # need_hidden
                torch.mm(dlogits, weight, out=grad_hidden[s : s + c])
            if grad_weight is not None:  # need_weight
                grad_weight.addmm_(dlogits.T.float(), h.float())  # no-op casts in fp32
            del logits, dlogits
        if grad_weight is not None and weight.dtype != torch.float32:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_token_logprobs(
    hidden: Tensor,  # [B, T, H] the states that predict `tokens` (already shifted)
    lm_head_weight: Tensor,  # [V, H]; tied input embeddings are fine: the gradient accumulates into it
    tokens: Tensor,  # [B, T] long
    chunk: int | None = None,  # rows per chunk; None: a 32 MiB fp32 [chunk, V] block (512 MiB on a GPU)
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    mask: Tensor | None = None,  # [B, T] 1 = real token; padded rows are never projected
    backend: str = "auto",  # auto (Triton on CUDA when installed, else torch) | torch | triton
) -> tuple[Tensor, Tensor | None]:
    """log softmax(hidden @ W.T / temperature)[tokens] without materialising [B, T, V] logits.

    Returns (logp [B, T] fp32, entropy [B, T] fp32 or None); 0 at masked positions. bf16 inputs are
    projected in bf16 and reduced in fp32; gradients come back in the inputs' dtypes.
    """
    B, T, _ = hidden.shape
    V = lm_head_weight.shape[0]
    backend = pick_backend(backend, hidden.device)
    chunk = chunk or default_chunk_rows(V, chunk_budget(hidden.device))
    flat_hidden, flat_tokens, rows = real_rows(hidden, tokens, mask)
    logp, entropy = _FusedLinearLogprobs.apply(
        flat_hidden, lm_head_weight, flat_tokens, chunk, 1.0 / temperature, with_entropy, backend
    )
    if not with_entropy:
        entropy = None
    elif not entropy_grad:
        entropy = entropy.detach()
    return to_grid(logp, rows, B, T), (to_grid(entropy, rows, B, T) if entropy is not None else None)


def real_rows(hidden: Tensor, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The positions lm_head should see: (hidden [R, H], tokens [R], their flat indices in [B * T] [R]).

    Only real (mask = 1) positions; all of them without a mask. Both are contiguous.
    """
    B, T, H = hidden.shape
    flat_hidden, flat_tokens = hidden.reshape(B * T, H), tokens.reshape(B * T)
    if mask is None:
        return flat_hidden.contiguous(), flat_tokens.contiguous(), torch.arange(B * T, device=hidden.device)
    rows = mask.reshape(B * T).nonzero().squeeze(1)  # [R]
    return flat_hidden.index_select(0, rows), flat_tokens.index_select(0, rows), rows


def to_grid(values: Tensor, rows: Tensor, B: int, T: int) -> Tensor:
    """values [R] of the flat positions `rows` back onto a [B, T] grid; 0 elsewhere (padding)."""
    return values.new_zeros(B * T).index_copy(0, rows, values).view(B, T)


# ---------------------------------------------------------------- a causal LM's completion tokens


SHARDED_METHOD = "sharded_completion_pass"  # the FSDP forward method parallel.fsdp registers on a sharded model

# (hidden [B, Tc, H], lm_head, completion tokens [B, Tc], completion mask [B, Tc]) -> what the caller needs
CompletionHead = Callable[[Tensor, torch.nn.Linear, Tensor, Tensor], Any]


def completion_pass(
    model: torch.nn.Module,
    input_ids: Tensor,  # [B, Tp + Tc] prompt (left-padded) then completion (right-padded)
    attention_mask: Tensor,  # [B, Tp + Tc]
    completion_len: int,  # Tc
    head: CompletionHead,
    share_prompts: bool = True,
) -> Any:
    """head(hidden states of the completion positions, lm_head, completion tokens, completion mask).

    Runs the decoder for hidden states only (one prefill per distinct prompt, see `models.forward`): what
    goes through lm_head, and how, is the head's choice. On an FSDP-sharded model the same pass runs as
    its registered forward method, which gathers the weights it reads outside the decoder layers
    (embeddings, lm_head).
    """
    sharded = getattr(model, SHARDED_METHOD, None)
    fn = sharded if sharded is not None else functools.partial(direct_completion_pass, model)
    return fn(input_ids, attention_mask, completion_len, head, share_prompts)


def direct_completion_pass(
    model: CausalLM,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_len: int,
    head: CompletionHead,
    share_prompts: bool = True,
) -> Any:
    """`completion_pass` on the model's own modules (the body of the sharded forward method)."""
    hidden = completion_hidden(model.get_decoder(), input_ids, attention_mask, completion_len, share_prompts)
    tokens, mask = input_ids[:, -completion_len:], attention_mask[:, -completion_len:]
    return head(hidden, model.get_output_embeddings(), tokens, mask)


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,  # [B, Tp + Tc]
    attention_mask: Tensor,  # [B, Tp + Tc]
    completion_len: int,  # Tc
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    backend: str = "auto",
    share_prompts: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the completion tokens under `model`: (logp [B, Tc], entropy [B, Tc] | None), 0 on padding.

    Only the real completion positions go through lm_head, fused with the log-softmax: prompt and padding
    positions never become [*, V] logits.
    """

    def head(hidden: Tensor, lm_head: torch.nn.Linear, tokens: Tensor, mask: Tensor):
        if getattr(lm_head, "bias", None) is not None:  # rare (Llama, Qwen, Mistral have none): logits, then chunked
            return token_logprobs(
                lm_head(hidden),
                tokens,
                temperature,
                with_entropy=with_entropy,
                entropy_grad=entropy_grad,
                mask=mask,
                backend=backend,
            )
        return fused_token_logprobs(
            hidden,
            lm_head.weight,
            tokens,
            temperature=temperature,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
            mask=mask,
            backend=backend,
        )

    return completion_pass(model, input_ids, attention_mask, completion_len, head, share_prompts)
