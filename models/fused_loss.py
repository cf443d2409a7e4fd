"""lm_head, log-softmax and a per-token loss in one pass, its gradients formed in the forward.

`fused_token_logprobs` returns log-probs whose upstream gradient is unknown until the loss is built,
so its backward projects every chunk again: four [rows, H] x [H, V] matmuls where lm_head + log_softmax
does three. When the loss is a sum over tokens of a function of each token's own log-prob (and
entropy), each token's upstream gradient is known as soon as its log-prob is, so a chunk's gradient
w.r.t. its logits, then w.r.t. hidden and lm_head, is formed while the chunk's logits are still alive
(Liger-Kernel's fused linear losses do the same). Three matmuls and no [R, V] tensor; kept for the
backward are d loss / d hidden [R, H] and d loss / d W [V, H], which it scales by the upstream scalar.

The clipped PPO/GRPO surrogate aggregated per token (grpo, bnpo, dr_grpo, dapo: fixed per-token
weights), the KL term and an entropy bonus are such sums; so is GSPO's sequence-level ratio once each
sequence's mean log-ratio is known and detached (`completion_token_loss`'s token_loss_for).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.logprobs import (
    chunk_budget,
    completion_pass,
    default_chunk_rows,
    fused_token_logprobs,
    logit_grad,
    logit_stats,
    pick_backend,
    real_rows,
    to_grid,
    token_logprobs,
)

# (logp [c] fp32, entropy [c] fp32 | None, positions [c] long: flat indices into [B * T]) -> loss per token [c]
TokenLoss = Callable[[Tensor, Tensor | None, Tensor], Tensor]


def token_loss_grads(
    token_loss: TokenLoss, logp: Tensor, entropy: Tensor | None, positions: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(sum of the chunk's losses, d/d logp [c], d/d entropy [c] | None), by autograd on the chunk alone.

    d/d entropy is None when the loss does not use the entropy (then it is only returned, for logging).
    """
    with torch.enable_grad():  # autograd.Function.forward runs without grad
        lp = logp.detach().requires_grad_()
        ent = entropy.detach().requires_grad_() if entropy is not None else None
        per_token = token_loss(lp, ent, positions)
        if per_token.shape != lp.shape:
            raise ValueError(
                f"token_loss must return one loss per token, shape {tuple(lp.shape)}; got {tuple(per_token.shape)}"
            )
        total = per_token.float().sum()
        inputs = [lp] if ent is None else [lp, ent]
        grads = torch.autograd.grad(total, inputs, allow_unused=True) if total.requires_grad else (None,) * len(inputs)
    g_logp = torch.zeros_like(lp) if grads[0] is None else grads[0].float()
    g_ent = grads[1].float() if ent is not None and grads[1] is not None else None  # None: entropy only logged
    return total.detach(), g_logp.detach(), None if g_ent is None else g_ent.detach()


def _torch_chunk(
    logits: Tensor,
    tokens: Tensor,
    inv_temp: float,
    spare: Tensor | None,
    loss_grads: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor, Tensor | None]],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """One chunk on the torch backend: (loss, logp [c], entropy [c] | None, d loss / d logits [c, V] fp32).

    In place on the scratch `logits` (fp32; bf16 gets one fp32 copy): shift by the row max, exp, sum;
    the gradient reuses the exps. With entropy (`spare`: a second fp32 [>= c, V] buffer) the shifted
    logits z' are kept beside their exps: E_p[z'] and the entropy's gradient p * (E_p[z'] - z') need them.
    """
    z = logits.float()  # the same tensor for fp32 logits
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    chosen = z.gather(-1, tokens[:, None]).squeeze(-1)
    row_max = z.amax(-1, keepdim=True)  # [c, 1]
    z.sub_(row_max)  # z' = z - max
    e = torch.exp(z, out=spare[: z.shape[0]]) if spare is not None else z.exp_()  # exp(z') [c, V]
    sum_e = e.sum(-1)  # [c]
    log_sum = sum_e.log()
    logp = chosen - row_max.squeeze(-1) - log_sum
    expected, entropy = None, None
    if spare is not None:
        expected = torch.bmm(e[:, None, :], z[:, :, None]).view(-1) / sum_e  # E_p[z'], no [c, V] product
        entropy = log_sum - expected  # lse - E_p[z] with the max cancelled
    total, g_logp, g_ent = loss_grads(logp, entropy)
    # d/dz = g_logp (onehot - p) + g_ent p (E_p[z'] - z');  dz/dlogits = 1 / temperature
    if g_ent is not None:
        assert expected is not None  # an entropy gradient needs the entropy: `spare` was given
        coef = z.mul_(-g_ent[:, None]).add_((g_ent * expected - g_logp)[:, None])  # [c, V]
        grad = e.mul_(coef).mul_((inv_temp / sum_e)[:, None])
    else:
        grad = e.mul_((-g_logp * inv_temp / sum_e)[:, None])
    grad.scatter_add_(-1, tokens[:, None], (g_logp * inv_temp)[:, None])
    return total, logp, entropy, grad


def _any_backend_chunk(
    logits: Tensor, tokens: Tensor, inv_temp: float, with_entropy: bool, backend: str, loss_grads
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """The same through models.logprobs' per-chunk stats and gradient (the Triton kernels on CUDA)."""
    lse, logp, expected = logit_stats(logits, tokens, inv_temp, with_entropy, backend, writable=False)
    entropy = lse - expected if expected is not None else None  # expected: only with_entropy
    total, g_logp, g_ent = loss_grads(logp, entropy)
    grad = logit_grad(logits, logits, tokens, lse, expected, g_logp, g_ent, inv_temp, backend)
    return total, logp, entropy, grad


class _FusedLinearTokenLoss(torch.autograd.Function):
    """hidden [R, H], weight [V, H] -> (sum of token losses [], logp [R], entropy [R]); the gradients
    w.r.t. hidden and weight are computed here, in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, positions, token_loss, chunk, inv_temp, with_entropy, backend):
        r, vocab = hidden.shape[0], weight.shape[0]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        logp = torch.empty(r, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp) if with_entropy else None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # fp32 accumulation over chunks, whatever the weight's dtype
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # [c, V] buffers reused by every chunk
        buffer = torch.empty(min(chunk, r), vocab, dtype=hidden.dtype, device=hidden.device)
        spare = (
            torch.empty(min(chunk, r), vocab, dtype=torch.float32, device=hidden.device)
            if with_entropy and backend == "torch"
            else None
        )
        for s in range(0, r, chunk):
            h, tok = hidden[s : s + chunk], tokens[s : s + chunk]
            logits = torch.mm(h, weight.T, out=buffer[: h.shape[0]])  # [c, V]: the only vocabulary-sized tensors

            def loss_grads(c_logp, c_entropy, positions=positions[s : s + chunk]):
                return token_loss_grads(token_loss, c_logp, c_entropy, positions)

            if backend == "torch":
                c_total, c_logp, c_ent, dlogits = _torch_chunk(logits, tok, inv_temp, spare, loss_grads)
            else:
                c_total, c_logp, c_ent, dlogits = _any_backend_chunk(
                    logits, tok, inv_temp, with_entropy, backend, loss_grads
                )
            total += c_total
            logp[s : s + chunk] = c_logp
            if with_entropy:
                assert entropy is not None and c_ent is not None  # both exist with_entropy
                entropy[s : s + chunk] = c_ent
            if grad_hidden is not None:  # need_hidden
                torch.mm(dlogits.to(weight.dtype), weight, out=grad_hidden[s : s + chunk])
            if grad_weight is not None:  # need_weight
                grad_weight.addmm_(dlogits.T.float(), h.float())  # no-op casts in fp32
            del logits, dlogits
        del buffer, spare
        if grad_weight is not None and weight.dtype != torch.float32:
            grad_weight = grad_weight.to(weight.dtype)
        # not save_for_backward: these are this Function's own results, scaled in place and released once used
        ctx.grads = (grad_hidden, grad_weight)
        if not with_entropy:
            entropy = logp.new_empty(0)  # a placeholder output, never used
        ctx.mark_non_differentiable(logp, entropy)
        return total, logp, entropy

    @staticmethod
    def backward(ctx, g_total, _g_logp, _g_entropy):
        if ctx.grads is None:
            raise RuntimeError("the fused token loss keeps its gradients for one backward only (no retain_graph)")
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        grad_hidden = None if grad_hidden is None else grad_hidden.mul_(g_total.to(grad_hidden.dtype))
        grad_weight = None if grad_weight is None else grad_weight.mul_(g_total.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def fused_token_loss(
    hidden: Tensor,  # [B, T, H] the states that predict `tokens` (already shifted)
    lm_head_weight: Tensor,  # [V, H]; tied input embeddings are fine
    tokens: Tensor,  # [B, T] long
    token_loss: TokenLoss,
    mask: Tensor | None = None,  # [B, T] 1 = real token; padded positions are never projected nor scored
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int | None = None,  # rows per chunk; None: a 32 MiB fp32 [chunk, V] block (512 MiB on a GPU)
    backend: str = "auto",  # auto (Triton on CUDA when installed, else torch) | torch | triton
) -> tuple[Tensor, Tensor, Tensor | None]:
    """sum over real positions of token_loss(logp, entropy, positions), with logp = log softmax(hidden @ W.T /
    temperature)[tokens], in one pass over lm_head.

    Returns (loss [] fp32 with gradients to `hidden` and `lm_head_weight`, logp [B, T] fp32 detached,
    entropy [B, T] fp32 detached or None); logp and entropy are 0 at masked positions. token_loss must be
    elementwise in the tokens: it sees one chunk of real positions at a time.
    """
    B, T, _ = hidden.shape
    backend = pick_backend(backend, hidden.device)
    chunk = chunk or default_chunk_rows(lm_head_weight.shape[0], chunk_budget(hidden.device))
    flat_hidden, flat_tokens, positions = real_rows(hidden, tokens, mask)  # only real positions reach lm_head
    loss, logp, entropy = _FusedLinearTokenLoss.apply(
        flat_hidden, lm_head_weight, flat_tokens, positions, token_loss, chunk, 1.0 / temperature, with_entropy, backend
    )
    return loss, to_grid(logp, positions, B, T), (to_grid(entropy, positions, B, T) if with_entropy else None)


def completion_token_loss(
    model: torch.nn.Module,
    input_ids: Tensor,  # [B, Tp + Tc] prompt (left-padded) then completion (right-padded)
    attention_mask: Tensor,  # [B, Tp + Tc]
    completion_len: int,  # Tc
    token_loss: TokenLoss | None,  # positions index the flattened [B, Tc] completion grid; None: token_loss_for
    temperature: float = 1.0,
    with_entropy: bool = False,
    backend: str = "auto",
    share_prompts: bool = True,
    token_loss_for: Callable[[Tensor], TokenLoss] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """`fused_token_loss` on the completion tokens of a causal LM: (loss [], logp [B, Tc], entropy [B, Tc] | None).

    The decoder pass is `models.logprobs.completion_pass`'s (one prefill per distinct prompt, FSDP-aware).
    `token_loss_for(logp [B, Tc] detached) -> TokenLoss`, when given, replaces `token_loss` by one built from
    the current log-probs, which a no-grad lm_head pass computes first: for a loss whose tokens depend on
    their sequence's other tokens only through a detached value (GSPO's sequence-level ratio).
    """

    def head(hidden: Tensor, lm_head: torch.nn.Linear, tokens: Tensor, mask: Tensor):
        biased = getattr(lm_head, "bias", None) is not None  # rare: full logits, then the loss over real positions
        if token_loss_for is not None:
            with torch.no_grad():
                if biased:
                    logp_now, _ = token_logprobs(lm_head(hidden), tokens, temperature, mask=mask, backend=backend)
                else:
                    logp_now, _ = fused_token_logprobs(
                        hidden, lm_head.weight, tokens, temperature=temperature, mask=mask, backend=backend
                    )
            loss_fn = token_loss_for(logp_now * mask)
        else:
            assert token_loss is not None, "completion_token_loss needs token_loss or token_loss_for"
            loss_fn = token_loss
        if biased:
            logp, entropy = token_logprobs(
                lm_head(hidden),
                tokens,
                temperature,
                with_entropy=with_entropy,
                entropy_grad=with_entropy,
                mask=mask,
                backend=backend,
            )
            positions = mask.reshape(-1).nonzero().squeeze(1)
            per_token = loss_fn(
                logp.reshape(-1)[positions], None if entropy is None else entropy.reshape(-1)[positions], positions
            )
            return per_token.float().sum(), logp.detach(), None if entropy is None else entropy.detach()
        return fused_token_loss(
            hidden,
            lm_head.weight,
            tokens,
            loss_fn,
            mask=mask,
            temperature=temperature,
            with_entropy=with_entropy,
            backend=backend,
        )

    return completion_pass(model, input_ids, attention_mask, completion_len, head, share_prompts)
