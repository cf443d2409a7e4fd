"""Chosen-token log-probs: the chunked path against log_softmax + gather, and completion log-probs of a
left-padded batch against a full forward pass and against each prompt run alone."""

from __future__ import annotations

import pytest
import torch

from models.logprobs import completion_logprobs, token_logprobs

B, T, V = 3, 7, 50


def random_logits(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen) * 3
    tokens = torch.randint(0, V, (B, T), generator=gen)
    return logits.to(dtype), tokens


def naive_logprobs(logits, tokens, temperature=1.0):
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp_all.gather(-1, tokens[..., None]).squeeze(-1), logp_all


# ---------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1024])
def test_token_logprobs_match_log_softmax_gather(temperature, chunk_rows):
    logits, tokens = random_logits()
    logp, entropy = token_logprobs(logits, tokens, temperature=temperature, chunk_rows=chunk_rows)
    expected, _ = naive_logprobs(logits, tokens, temperature)
    assert entropy is None
    assert logp.shape == (B, T) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1024])
def test_token_logprobs_entropy_matches_definition(temperature, chunk_rows):
    logits, tokens = random_logits(seed=1)
    _, entropy = token_logprobs(logits, tokens, temperature=temperature, chunk_rows=chunk_rows, with_entropy=True)
    _, logp_all = naive_logprobs(logits, tokens, temperature)
    expected = -(logp_all.exp() * logp_all).sum(-1)
    assert entropy.shape == (B, T) and entropy.dtype == torch.float32
    torch.testing.assert_close(entropy, expected, atol=1e-5, rtol=1e-5)
    assert (entropy >= 0).all() and (entropy <= torch.log(torch.tensor(float(V))) + 1e-5).all()


def test_token_logprobs_entropy_carries_no_gradient():
    logits, tokens = random_logits()
    logits.requires_grad_(True)
    logp, entropy = token_logprobs(logits, tokens, with_entropy=True)
    assert logp.requires_grad and not entropy.requires_grad


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1024])
def test_token_logprobs_entropy_grad_matches_naive_entropy_gradient(temperature, chunk_rows):
    logits, tokens = random_logits(seed=8)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    _, entropy = token_logprobs(a, tokens, temperature=temperature, chunk_rows=chunk_rows, with_entropy=True,
                                entropy_grad=True)
    _, logp_all = naive_logprobs(b, tokens, temperature)
    expected = -(logp_all.exp() * logp_all).sum(-1)
    weights = torch.randn(B, T, generator=torch.Generator().manual_seed(10))
    (grad,) = torch.autograd.grad((entropy * weights).sum(), a)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), b)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_token_logprobs_entropy_grad_respects_no_grad():
    logits, tokens = random_logits()
    logits.requires_grad_(True)
    with torch.no_grad():
        logp, entropy = token_logprobs(logits, tokens, with_entropy=True, entropy_grad=True)
    assert not logp.requires_grad and not entropy.requires_grad


def test_token_logprobs_lower_temperature_sharpens_the_distribution():
    logits, tokens = random_logits(seed=2)
    _, hot = token_logprobs(logits, tokens, temperature=1.0, with_entropy=True)
    _, cold = token_logprobs(logits, tokens, temperature=0.5, with_entropy=True)
    assert (cold < hot).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1024])
def test_token_logprobs_gradient_matches_naive_path(temperature, chunk_rows):
    logits, tokens = random_logits(seed=3)
    weights = torch.randn(B, T, generator=torch.Generator().manual_seed(9))  # a generic upstream gradient
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    logp, _ = token_logprobs(a, tokens, temperature=temperature, chunk_rows=chunk_rows)
    expected, _ = naive_logprobs(b, tokens, temperature)
    (grad,) = torch.autograd.grad((logp * weights).sum(), a)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), b)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 5, 1024])
def test_token_logprobs_with_padding_mask_match_on_real_positions(chunk_rows):
    logits, tokens = random_logits(seed=4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]]).float()
    tokens = tokens.masked_fill(mask == 0, 0)  # padding holds the pad id, as in a batch
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    logp, _ = token_logprobs(a, tokens, chunk_rows=chunk_rows)
    expected, _ = naive_logprobs(b, tokens)
    masked = logp * mask
    assert (masked[mask == 0] == 0).all()
    torch.testing.assert_close(masked, expected * mask, atol=1e-6, rtol=1e-6)
    (grad,) = torch.autograd.grad(masked.sum(), a)
    (expected_grad,) = torch.autograd.grad((expected * mask).sum(), b)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)
    assert (grad[mask == 0] == 0).all()  # padded positions get no gradient


def test_token_logprobs_bf16_logits_give_fp32_close_to_fp32_reference():
    logits, tokens = random_logits(seed=5)
    bf16 = logits.to(torch.bfloat16)
    for temperature in (1.0, 0.7):
        logp, entropy = token_logprobs(bf16, tokens, temperature=temperature, chunk_rows=5, with_entropy=True)
        expected, logp_all = naive_logprobs(logits, tokens, temperature)
        assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
        torch.testing.assert_close(logp, expected, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(entropy, -(logp_all.exp() * logp_all).sum(-1), atol=2e-2, rtol=2e-2)
        # exact on the bf16 values themselves: the accumulation is fp32
        exact, _ = naive_logprobs(bf16.float(), tokens, temperature)
        torch.testing.assert_close(logp, exact, atol=1e-6, rtol=1e-6)


def test_token_logprobs_bf16_gradient_flows_back_in_bf16():
    logits, tokens = random_logits(seed=6)
    bf16 = logits.to(torch.bfloat16).requires_grad_(True)
    logp, _ = token_logprobs(bf16, tokens)
    logp.sum().backward()
    assert bf16.grad.dtype == torch.bfloat16
    ref = logits.to(torch.bfloat16).float().requires_grad_(True)
    naive_logprobs(ref, tokens)[0].sum().backward()
    torch.testing.assert_close(bf16.grad.float(), ref.grad, atol=1e-2, rtol=1e-2)


def test_token_logprobs_are_nonpositive_and_normalised():
    logits, _ = random_logits(seed=7)
    # summing exp(log p) over every possible token gives 1 at each position
    total = torch.zeros(B, T)
    for v in range(V):
        logp, _ = token_logprobs(logits, torch.full((B, T), v), chunk_rows=4)
        assert (logp <= 0).all()
        total += logp.exp()
    torch.testing.assert_close(total, torch.ones(B, T), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- completion_logprobs


PROMPTS = [[19556, 905, 28], [638, 359, 346, 47, 905, 19556]]  # lengths 3 and 6
COMPLETIONS = [[11, 2000, 345, 7], [88, 99, 4000, 12]]
TC = 4


def left_padded_batch(pad_id):
    width = max(len(p) for p in PROMPTS)
    ids, attn = [], []
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        pad = width - len(prompt)
        ids.append([pad_id] * pad + prompt + completion)
        attn.append([0] * pad + [1] * (len(prompt) + len(completion)))
    return torch.tensor(ids), torch.tensor(attn)


def straightforward_completion_logprobs(model, input_ids, attention_mask, temperature=1.0):
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)[:, -TC - 1 : -1]  # position t predicts t+1
    return logp_all.gather(-1, input_ids[:, -TC:, None]).squeeze(-1), logp_all


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_match_full_forward_log_softmax_gather(tiny_model, tokenizer, temperature):
    input_ids, attention_mask = left_padded_batch(tokenizer.pad_token_id)
    with torch.no_grad():
        logp, entropy = completion_logprobs(tiny_model, input_ids, attention_mask, TC, temperature=temperature,
                                            with_entropy=True)
        expected, logp_all = straightforward_completion_logprobs(tiny_model, input_ids, attention_mask, temperature)
    assert logp.shape == (2, TC) and entropy.shape == (2, TC)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, -(logp_all.exp() * logp_all).sum(-1), atol=1e-5, rtol=1e-5)


def test_completion_logprobs_left_padded_equal_prompt_alone(tiny_model, tokenizer):
    input_ids, attention_mask = left_padded_batch(tokenizer.pad_token_id)
    assert attention_mask[0, 0] == 0  # the short prompt really is padded
    with torch.no_grad():
        batched, _ = completion_logprobs(tiny_model, input_ids, attention_mask, TC)
        for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
            alone_ids = torch.tensor([prompt + completion])
            alone, _ = completion_logprobs(tiny_model, alone_ids, torch.ones_like(alone_ids), TC)
            torch.testing.assert_close(batched[row], alone[0], atol=1e-4, rtol=1e-4)
            if row == 0:
                short_alone = alone[0]
        # the check has teeth: attending to the padding would move the short prompt's log-probs
        unmasked, _ = completion_logprobs(tiny_model, input_ids, torch.ones_like(attention_mask), TC)
        assert (unmasked[0] - short_alone).abs().max() > 1e-3


def test_completion_logprobs_gradient_reaches_the_model(tiny_model, tokenizer):
    input_ids, attention_mask = left_padded_batch(tokenizer.pad_token_id)
    logp, _ = completion_logprobs(tiny_model, input_ids, attention_mask, TC)
    logp.sum().backward()
    grads = [p.grad for p in tiny_model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
