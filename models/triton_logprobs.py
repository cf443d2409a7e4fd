"""Triton kernels for the per-row reductions of `models.logprobs` (the CUDA path).

The matmuls stay with cuBLAS (`hidden @ W.T`, `dlogits @ W`, `dlogits.T @ hidden`); what the kernels
fuse is everything between them, which in PyTorch is several passes over a [rows, V] block:
- `chunk_stats`: one pass over each row of logits with an online logsumexp (and the online sum of
  p * z for the entropy), reading bf16 or fp32 and accumulating in fp32;
- `chunk_grad_`: one pass that writes d/dlogits = (g * (onehot - p) + g_ent * p * (E_p[z] - z)) / T,
  in place over the logits when asked to, so backward needs no second [rows, V] buffer.

One program per row, looping over the vocabulary in blocks. On a CPU the kernels run under Triton's
interpreter (`TRITON_INTERPRET=1`, set before this module is imported), which is how the tests check
them against the PyTorch reference on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs


@triton.jit
def _stats_kernel(
    x_ptr, x_stride, tok_ptr, lse_ptr, logp_ptr, ez_ptr, V, inv_temp, WITH_ENT: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    m = float("-inf")  # running max of z
    s = 0.0  # running sum of exp(z - m)
    t = 0.0  # running sum of exp(z - m) * z (entropy only)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        z = tl.load(x_row + offs, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, 0))
        rescale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 on the masked tail
        s = s * rescale + tl.sum(e, 0)
        if WITH_ENT:
            t = t * rescale + tl.sum(e * tl.where(valid, z, 0.0), 0)  # 0 * 0 on the tail, not 0 * -inf
        m = m_new
    lse = m + tl.log(s)
    tok = tl.load(tok_ptr + row)
    z_tok = tl.load(x_row + tok).to(tl.float32) * inv_temp
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_tok - lse)
    if WITH_ENT:
        tl.store(ez_ptr + row, t / s)


@triton.jit
def _grad_kernel(
    x_ptr,
    x_stride,
    out_ptr,
    out_stride,
    tok_ptr,
    lse_ptr,
    ez_ptr,
    g_logp_ptr,
    g_ent_ptr,
    V,
    inv_temp,
    WITH_ENT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    out_row = out_ptr + row * out_stride
    tok = tl.load(tok_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_logp_ptr + row)
    if WITH_ENT:
        ez = tl.load(ez_ptr + row)
        g_ent = tl.load(g_ent_ptr + row)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < V
        z = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(z - lse)
        if WITH_ENT:
            d = p * (g_ent * (ez - z) - g)
        else:
            d = -g * p
        d = tl.where(offs == tok, d + g, d) * inv_temp
        # each element is read before it is written, by the same program: in place is safe
        tl.store(out_row + offs, d.to(out_ptr.dtype.element_ty), mask=valid)


def _block(vocab_size: int) -> int:
    return min(triton.next_power_of_2(vocab_size), 4096)


def _check(*tensors: Tensor) -> None:
    if tensors[0].device.type != "cuda" and not knobs.runtime.interpret:
        raise RuntimeError(
            "the Triton log-prob kernels run on CUDA tensors, or on CPU under TRITON_INTERPRET=1 "
            "(set before models.triton_logprobs is imported); use backend='torch' otherwise"
        )


def _rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def chunk_stats(
    logits: Tensor, tokens: Tensor, inv_temp: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """logits [c, V] (any float dtype), tokens [c] -> (lse [c], logp [c], E_p[z] [c] | None), fp32."""
    _check(logits)
    logits = _rows(logits)
    c, V = logits.shape
    lse = torch.empty(c, dtype=torch.float32, device=logits.device)
    logp = lse.new_empty(c)
    expected_z = lse.new_empty(c) if with_entropy else lse  # a dummy pointer when unused
    if c:
        _stats_kernel[(c,)](
            logits,
            logits.stride(0),
            tokens.contiguous(),
            lse,
            logp,
            expected_z,
            V,
            float(inv_temp),
            WITH_ENT=with_entropy,
            BLOCK=_block(V),
        )
    return lse, logp, (expected_z if with_entropy else None)


def chunk_grad_(
    logits: Tensor,
    out: Tensor,
    tokens: Tensor,
    lse: Tensor,
    expected_z: Tensor | None,
    g_logp: Tensor,
    g_ent: Tensor | None,
    inv_temp: float,
) -> Tensor:
    """d(sum g_logp * logp + g_ent * entropy) / d logits [c, V], written into `out` (may be `logits`)."""
    _check(logits, out)
    logits = _rows(logits)
    if out.stride(-1) != 1:
        raise ValueError("chunk_grad_ writes rows: `out` needs a unit last stride")
    c, V = logits.shape
    with_entropy = g_ent is not None
    assert not with_entropy or expected_z is not None  # an entropy gradient needs E_p[z]
    if c:
        _grad_kernel[(c,)](
            logits,
            logits.stride(0),
            out,
            out.stride(0),
            tokens.contiguous(),
            lse.contiguous(),
            expected_z.contiguous() if expected_z is not None and with_entropy else lse,
            g_logp.contiguous(),
            g_ent.contiguous() if g_ent is not None else g_logp,
            V,
            float(inv_temp),
            WITH_ENT=with_entropy,
            BLOCK=_block(V),
        )
    return out
