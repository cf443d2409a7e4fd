"""fused_token_loss (lm_head + log-softmax + a per-token loss, gradients formed in the forward) against
the plain route: h @ W.T, log_softmax, gather, the same loss, autograd."""

from __future__ import annotations

import pytest
import torch

from models.fused_loss import completion_token_loss, fused_token_loss
from models.logprobs import completion_logprobs, fused_token_logprobs

B, T, H, V = 3, 7, 16, 300


def inputs(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.5).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    old_logp = -torch.rand(B, T, generator=gen) * 6
    advantages = torch.randn(B, T, generator=gen)
    return hidden, weight, tokens, old_logp, advantages


def surrogate_loss(old_logp, advantages, ent_coef=0.05):
    """A clipped PPO surrogate minus an entropy bonus, per token: nonlinear in logp and in entropy."""
    flat_old, flat_adv = old_logp.reshape(-1), advantages.reshape(-1)

    def token_loss(logp, entropy, positions):
        ratio = torch.exp(logp - flat_old[positions])
        adv = flat_adv[positions]
        loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        return loss - ent_coef * entropy if entropy is not None else loss

    return token_loss


def reference(hidden, weight, tokens, token_loss, mask, temperature):
    """(loss, logp [B, T], entropy [B, T], d/dhidden, d/dweight) the plain way, in float64."""
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    logp_all = torch.log_softmax((h @ w.T) / temperature, dim=-1)
    logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    positions = mask.reshape(-1).nonzero().squeeze(1)
    loss = token_loss(logp.reshape(-1)[positions], entropy.reshape(-1)[positions], positions).sum()
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return loss.detach(), (logp * mask).detach(), (entropy * mask).detach(), grad_h, grad_w


def fused(hidden, weight, tokens, token_loss, mask, temperature, chunk, with_entropy=True):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, logp, entropy = fused_token_loss(
        h,
        w,
        tokens,
        token_loss,
        mask=mask,
        temperature=temperature,
        with_entropy=with_entropy,
        chunk=chunk,
        backend="torch",
    )
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return loss.detach(), logp, entropy, grad_h, grad_w


@pytest.mark.parametrize("chunk", [1, 4, None])  # one row, a chunk that does not divide R, one chunk
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_the_plain_route_values_and_gradients(chunk, temperature):
    hidden, weight, tokens, old_logp, advantages = inputs(seed=0)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    token_loss = surrogate_loss(old_logp, advantages)
    got = fused(hidden, weight, tokens, token_loss, mask, temperature, chunk)
    expected = reference(hidden, weight, tokens, token_loss, mask, temperature)
    for name, a, b in zip(("loss", "logp", "entropy", "grad_hidden", "grad_weight"), got, expected):
        torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert (got[1][mask == 0] == 0).all() and (got[3][mask == 0] == 0).all()  # padding: no value, no gradient


def test_linear_loss_equals_fused_logprobs_then_weighted_sum():
    """With sum(g * logp) both fused routes give the same gradients (3 matmuls vs 4)."""
    hidden, weight, tokens, _, _ = inputs(seed=1)
    g = torch.randn(B, T, generator=torch.Generator().manual_seed(5))
    flat_g = g.reshape(-1)
    got = fused(hidden, weight, tokens, lambda lp, ent, pos: flat_g[pos] * lp, None, 1.0, 8, with_entropy=False)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, _ = fused_token_logprobs(h, w, tokens, chunk=8, backend="torch")
    expected_grads = torch.autograd.grad((logp * g).sum(), (h, w))
    torch.testing.assert_close(got[0], (logp * g).sum().detach())
    torch.testing.assert_close(got[3], expected_grads[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[4], expected_grads[1], atol=1e-5, rtol=1e-5)
    assert got[2] is None  # no entropy asked for


def test_frozen_lm_head_gets_no_gradient_and_hidden_still_does():
    hidden, weight, tokens, old_logp, advantages = inputs(seed=2)
    h = hidden.clone().requires_grad_(True)
    loss, _, _ = fused_token_loss(
        h, weight, tokens, surrogate_loss(old_logp, advantages), with_entropy=True, chunk=5, backend="torch"
    )
    loss.backward()
    expected = reference(hidden, weight, tokens, surrogate_loss(old_logp, advantages), torch.ones(B, T), 1.0)
    torch.testing.assert_close(h.grad, expected[3].float(), atol=1e-5, rtol=1e-5)
    assert weight.grad is None


def test_upstream_gradient_scales_the_saved_gradients():
    hidden, weight, tokens, old_logp, advantages = inputs(seed=3)
    token_loss = surrogate_loss(old_logp, advantages)
    _, _, _, gh, gw = fused(hidden, weight, tokens, token_loss, None, 1.0, 4)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _, _ = fused_token_loss(h, w, tokens, token_loss, with_entropy=True, chunk=4, backend="torch")
    (-2.5 * loss).backward()
    torch.testing.assert_close(h.grad, -2.5 * gh)
    torch.testing.assert_close(w.grad, -2.5 * gw)


def test_a_second_backward_is_a_clear_error():
    hidden, weight, tokens, old_logp, advantages = inputs(seed=3)
    h = hidden.clone().requires_grad_(True)
    loss, _, _ = fused_token_loss(h, weight, tokens, surrogate_loss(old_logp, advantages), backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward only"):
        loss.backward()


def test_bf16_inputs_give_bf16_gradients_close_to_fp32():
    hidden, weight, tokens, old_logp, advantages = inputs(seed=4, dtype=torch.bfloat16)
    token_loss = surrogate_loss(old_logp, advantages)
    got = fused(hidden, weight, tokens, token_loss, None, 1.0, 4)
    expected = reference(hidden.float(), weight.float(), tokens, token_loss, torch.ones(B, T), 1.0)
    assert got[3].dtype == torch.bfloat16 and got[4].dtype == torch.bfloat16
    assert got[1].dtype == torch.float32  # log-probs accumulate in fp32
    torch.testing.assert_close(got[1], expected[1].float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(got[3].float(), expected[3].float(), atol=0.02, rtol=0.05)


def test_loss_without_entropy_or_logp_dependence_gets_zero_gradients_there():
    hidden, weight, tokens, _, _ = inputs(seed=5)
    got = fused(hidden, weight, tokens, lambda lp, ent, pos: torch.zeros_like(lp), None, 1.0, 4)
    assert float(got[0]) == 0.0
    assert torch.count_nonzero(got[3]) == 0 and torch.count_nonzero(got[4]) == 0


def test_non_finite_token_loss_makes_the_loss_non_finite():
    """The update loop skips a step on a non-finite loss: a NaN must not be summed away."""
    hidden, weight, tokens, _, _ = inputs(seed=6)
    loss, _, _, _, _ = fused(hidden, weight, tokens, lambda lp, ent, pos: lp * float("nan"), None, 1.0, 4)
    assert not torch.isfinite(loss)


def test_token_loss_of_the_wrong_shape_is_a_clear_error():
    hidden, weight, tokens, _, _ = inputs(seed=7)
    with pytest.raises(ValueError, match="one loss per token"):
        fused_token_loss(hidden, weight, tokens, lambda lp, ent, pos: lp.sum(), backend="torch")


def test_completion_token_loss_on_a_causal_lm_matches_logprobs_then_loss(tiny_model):
    """Every parameter's gradient (tied embeddings included) equals the two-pass route's."""
    gen = torch.Generator().manual_seed(0)
    vocab = tiny_model.config.vocab_size
    input_ids = torch.randint(0, vocab, (3, 9), generator=gen)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[0, :2] = 0  # left-padded prompt
    attention_mask[1, -2:] = 0  # right-padded completion
    tc = 5
    old_logp = -torch.rand(3, tc, generator=gen) * 5
    advantages = torch.randn(3, tc, generator=gen)
    token_loss = surrogate_loss(old_logp, advantages)
    loss, logp, entropy = completion_token_loss(
        tiny_model, input_ids, attention_mask, tc, token_loss, 0.9, with_entropy=True
    )
    loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad(set_to_none=True)
    logp2, entropy2 = completion_logprobs(
        tiny_model, input_ids, attention_mask, tc, 0.9, with_entropy=True, entropy_grad=True
    )
    mask = attention_mask[:, -tc:]
    positions = mask.reshape(-1).nonzero().squeeze(1)
    loss2 = token_loss(logp2.reshape(-1)[positions], entropy2.reshape(-1)[positions], positions).sum()
    loss2.backward()
    torch.testing.assert_close(loss, loss2.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp, logp2.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, entropy2.detach(), atol=1e-5, rtol=1e-5)
    for name, param in tiny_model.named_parameters():
        torch.testing.assert_close(fused_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
