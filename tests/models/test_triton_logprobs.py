"""The Triton kernels (backend="triton") against log_softmax + gather: values and gradients, from logits
and fused with lm_head. Without a GPU they run under Triton's interpreter, on small shapes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton); the torch backend is tested")

from triton import knobs

from models.fused_loss import fused_token_loss
from models.logprobs import fused_token_logprobs, token_logprobs

if not torch.cuda.is_available() and not knobs.runtime.interpret:
    pytest.skip(
        "no GPU and TRITON_INTERPRET is off (tests/conftest.py sets it before triton is imported)",
        allow_module_level=True,
    )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T, H, V = 2, 5, 16, 300  # V = 300 is not a power of two: the kernels' tail mask is exercised


def inputs(seed, dtype=torch.float32, vocab=V):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(vocab, H, generator=gen) * 0.5
    tokens = torch.randint(0, vocab, (B, T), generator=gen)
    upstream = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    return [x.to(DEVICE) for x in (hidden.to(dtype), weight.to(dtype), tokens, *upstream)]


def naive(hidden, weight, tokens, temperature):
    logp_all = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    return logp_all.gather(-1, tokens[..., None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def value_and_grads(fn, hidden, weight, tokens, g_logp, g_ent):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = fn(h, w, tokens)
    objective = (logp * g_logp).sum() + (0 if g_ent is None else (entropy * g_ent).sum())
    return (logp, entropy, *torch.autograd.grad(objective, (h, w)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_triton_fused_matches_naive(temperature, entropy_grad):
    hidden, weight, tokens, g_logp, g_ent = inputs(seed=1)
    g_ent = g_ent if entropy_grad else None
    got = value_and_grads(
        lambda h, w, t: fused_token_logprobs(
            h, w, t, chunk=3, temperature=temperature, with_entropy=True, entropy_grad=entropy_grad, backend="triton"
        ),
        hidden,
        weight,
        tokens,
        g_logp,
        g_ent,
    )
    expected = value_and_grads(lambda h, w, t: naive(h, w, t, temperature), hidden, weight, tokens, g_logp, g_ent)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_triton_from_logits_matches_naive(temperature):
    hidden, weight, tokens, g_logp, g_ent = inputs(seed=2)
    logits = (hidden @ weight.T).detach()
    got_in, expected_in = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    logp, entropy = token_logprobs(
        got_in, tokens, temperature, chunk_rows=4, with_entropy=True, entropy_grad=True, backend="triton"
    )
    logp_all = torch.log_softmax(expected_in / temperature, dim=-1)
    expected = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    expected_entropy = -(logp_all.exp() * logp_all).sum(-1)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad((logp * g_logp + entropy * g_ent).sum(), got_in)
    (expected_grad,) = torch.autograd.grad((expected * g_logp + expected_entropy * g_ent).sum(), expected_in)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_triton_matches_torch_backend_with_padding_and_bf16():
    hidden, weight, tokens, g_logp, _ = inputs(seed=3, dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        results[backend] = value_and_grads(
            lambda h, w, t, backend=backend: fused_token_logprobs(
                h, w, t, chunk=2, with_entropy=True, mask=mask, backend=backend
            ),
            hidden,
            weight,
            tokens,
            g_logp,
            None,
        )
    (logp, entropy, grad_h, grad_w), (logp_t, entropy_t, grad_h_t, grad_w_t) = results["triton"], results["torch"]
    torch.testing.assert_close(logp, logp_t, atol=1e-5, rtol=1e-5)  # fp32 reductions of the same bf16 logits
    torch.testing.assert_close(entropy, entropy_t, atol=1e-5, rtol=1e-5)
    # bf16 gradients: the fp32 d/dlogits of the two backends may round to neighbouring bf16 values
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16
    torch.testing.assert_close(grad_h.float(), grad_h_t.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad_w.float(), grad_w_t.float(), atol=2e-2, rtol=2e-2)
    assert (results["triton"][0][mask == 0] == 0).all()


def test_triton_vocabulary_spanning_several_blocks():
    # V above the kernels' 4096-wide block: the online logsumexp must carry across blocks
    hidden, weight, tokens, g_logp, g_ent = inputs(seed=4, vocab=5000)
    hidden, tokens, g_logp, g_ent = hidden[:1, :2], tokens[:1, :2], g_logp[:1, :2], g_ent[:1, :2]
    got = value_and_grads(
        lambda h, w, t: fused_token_logprobs(h, w, t, with_entropy=True, entropy_grad=True, backend="triton"),
        hidden,
        weight,
        tokens,
        g_logp,
        g_ent,
    )
    expected = value_and_grads(lambda h, w, t: naive(h, w, t, 1.0), hidden, weight, tokens, g_logp, g_ent)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_triton_fused_loss_matches_naive(temperature):
    """models.fused_loss on the Triton kernels: a nonlinear loss of logp and entropy, gradients in the forward."""
    hidden, weight, tokens, g_logp, g_ent = inputs(seed=5)
    flat_a, flat_b = g_logp.reshape(-1), g_ent.reshape(-1)

    def token_loss(logp, entropy, positions):  # exp(logp) * a + entropy * b: the gradient depends on logp
        return torch.exp(logp) * flat_a[positions] + entropy * flat_b[positions]

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, logp, entropy = fused_token_loss(
        h, w, tokens, token_loss, temperature=temperature, with_entropy=True, chunk=3, backend="triton"
    )
    got = (loss, logp, entropy, *torch.autograd.grad(loss, (h, w)))
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp2, entropy2 = naive(h2, w2, tokens, temperature)
    loss2 = token_loss(logp2.reshape(-1), entropy2.reshape(-1), torch.arange(logp2.numel(), device=DEVICE)).sum()
    expected = (loss2, logp2, entropy2, *torch.autograd.grad(loss2, (h2, w2)))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.detach(), atol=1e-5, rtol=1e-5)
