"""Chosen-token log-probs: the chunked path and the fused lm_head path against log_softmax + gather
(values and gradients), and completion log-probs of a left-padded batch against a full forward pass and
against each prompt run alone."""

from __future__ import annotations

import pytest
import torch

from models.logprobs import (
    CHUNK_BYTES,
    CUDA_CHUNK_BYTES,
    chunk_budget,
    completion_logprobs,
    default_chunk_rows,
    fused_token_logprobs,
    token_logprobs,
)

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
    _, entropy = token_logprobs(
        a, tokens, temperature=temperature, chunk_rows=chunk_rows, with_entropy=True, entropy_grad=True
    )
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


def test_token_logprobs_mask_argument_zeroes_padding_with_any_pad_id():
    logits, tokens = random_logits(seed=22)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]])
    a = logits.clone().requires_grad_(True)
    logp, entropy = token_logprobs(a, tokens.masked_fill(mask == 0, -100), chunk_rows=4, with_entropy=True, mask=mask)
    expected, logp_all = naive_logprobs(logits, tokens)
    torch.testing.assert_close(logp, expected * mask, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(entropy, -(logp_all.exp() * logp_all).sum(-1) * mask, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(logp.sum(), a)
    assert (grad[mask == 0] == 0).all() and (grad[mask == 1] != 0).any()


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


# ---------------------------------------------------------------- fused_token_logprobs

H = 16


def random_hidden(dtype=torch.float32, seed=0, vocab=V):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(vocab, H, generator=gen) * 0.5  # logits of std ~2, as a trained LM's
    tokens = torch.randint(0, vocab, (B, T), generator=gen)
    return hidden.to(dtype), weight.to(dtype), tokens


def naive_linear_logprobs(hidden, weight, tokens, temperature=1.0):
    """lm_head then log_softmax + gather: (logp [B, T], entropy [B, T])."""
    logp_all = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    return logp_all.gather(-1, tokens[..., None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def grads_of(fn, hidden, weight, tokens, weights, ent_weights=None):
    """(logp, entropy, d/dhidden, d/dweight) of sum(w * logp) [+ sum(w_ent * entropy)] for fn."""
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = fn(h, w, tokens)
    objective = (logp * weights).sum() + ((entropy * ent_weights).sum() if ent_weights is not None else 0)
    return (logp, entropy, *torch.autograd.grad(objective, (h, w)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_fused_logprobs_values_and_gradients_match_naive(temperature, chunk):
    hidden, weight, tokens = random_hidden(seed=11)
    weights = torch.randn(B, T, generator=torch.Generator().manual_seed(12))
    fused = grads_of(
        lambda h, w, t: fused_token_logprobs(
            h, w, t, chunk=chunk, temperature=temperature, with_entropy=True, backend="torch"
        ),
        hidden,
        weight,
        tokens,
        weights,
    )
    naive = grads_of(lambda h, w, t: naive_linear_logprobs(h, w, t, temperature), hidden, weight, tokens, weights)
    assert fused[0].shape == (B, T) and fused[0].dtype == torch.float32
    for got, expected in zip(fused, naive):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_entropy_gradient_matches_naive(temperature):
    hidden, weight, tokens = random_hidden(seed=13)
    gen = torch.Generator().manual_seed(14)
    weights, ent_weights = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    fused = grads_of(
        lambda h, w, t: fused_token_logprobs(
            h, w, t, chunk=5, temperature=temperature, with_entropy=True, entropy_grad=True, backend="torch"
        ),
        hidden,
        weight,
        tokens,
        weights,
        ent_weights,
    )
    naive = grads_of(
        lambda h, w, t: naive_linear_logprobs(h, w, t, temperature), hidden, weight, tokens, weights, ent_weights
    )
    for got, expected in zip(fused, naive):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_fused_entropy_without_entropy_grad_is_detached():
    hidden, weight, tokens = random_hidden(seed=15)
    logp, entropy = fused_token_logprobs(hidden.requires_grad_(True), weight, tokens, with_entropy=True)
    assert logp.requires_grad and not entropy.requires_grad
    logp, entropy = fused_token_logprobs(hidden, weight, tokens)
    assert entropy is None


def test_fused_padding_mask_skips_padded_rows():
    hidden, weight, tokens = random_hidden(seed=16)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]])
    tokens = tokens.masked_fill(mask == 0, -100)  # padding may hold an id outside the vocabulary
    weights = torch.randn(B, T, generator=torch.Generator().manual_seed(17))
    fused = grads_of(
        lambda h, w, t: fused_token_logprobs(h, w, t, chunk=2, with_entropy=True, mask=mask, backend="torch"),
        hidden,
        weight,
        tokens,
        weights,
    )
    safe_tokens = tokens.masked_fill(mask == 0, 0)
    naive = grads_of(
        lambda h, w, t: [x * mask for x in naive_linear_logprobs(h, w, safe_tokens)], hidden, weight, tokens, weights
    )
    for got, expected in zip(fused, naive):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    logp, entropy, grad_hidden, _ = fused
    assert (logp[mask == 0] == 0).all() and (entropy[mask == 0] == 0).all()
    assert (grad_hidden[mask == 0] == 0).all()  # padded positions get no gradient


def test_fused_with_tied_embeddings_accumulates_both_uses():
    gen = torch.Generator().manual_seed(18)
    embedding = torch.randn(V, H, generator=gen) * 0.5  # one matrix: input embedding and lm_head
    mixer = torch.randn(H, H, generator=gen) / H**0.5
    ids = torch.randint(0, V, (B, T + 1), generator=gen)
    weights = torch.randn(B, T, generator=gen)

    def objective(path):
        emb = embedding.clone().requires_grad_(True)
        hidden = torch.tanh(emb[ids[:, :-1]] @ mixer)  # [B, T, H] from the same embedding
        if path == "fused":
            logp, _ = fused_token_logprobs(hidden, emb, ids[:, 1:], chunk=3, backend="torch")
        else:
            logp, _ = naive_linear_logprobs(hidden, emb, ids[:, 1:])
        (grad,) = torch.autograd.grad((logp * weights).sum(), emb)
        return logp, grad

    (logp, grad), (expected, expected_grad) = objective("fused"), objective("naive")
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_fused_bf16_inputs_reduce_in_fp32_and_return_bf16_gradients():
    hidden, weight, tokens = random_hidden(torch.bfloat16, seed=19)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = fused_token_logprobs(h, w, tokens, chunk=4, temperature=0.7, with_entropy=True, backend="torch")
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    # the bf16 logits, reduced in fp32: the same numbers as log_softmax of those logits upcast
    expected, expected_entropy = naive_linear_logprobs(hidden, weight, tokens, 0.7)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    # and close to the fp32 computation (bf16 logits are only good to ~3 digits)
    fp32, _ = naive_linear_logprobs(hidden.float(), weight.float(), tokens, 0.7)
    torch.testing.assert_close(logp, fp32, atol=5e-2, rtol=5e-2)
    logp.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    _, _, grad_h, grad_w = grads_of(
        lambda a, b, t: naive_linear_logprobs(a, b, t, 0.7), hidden.float(), weight.float(), tokens, torch.ones(B, T)
    )
    torch.testing.assert_close(h.grad.float(), grad_h, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(w.grad.float(), grad_w, atol=5e-2, rtol=5e-2)


def test_fused_keeps_no_vocabulary_sized_tensor_for_backward():
    vocab = 4000  # larger than every other dimension, so a saved [*, V] tensor stands out
    hidden, weight, tokens = random_hidden(seed=20, vocab=vocab)
    saved_sizes = []

    def pack(t):
        saved_sizes.append(t.numel())
        return t

    for fn in ("fused", "naive"):
        saved_sizes.clear()
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if fn == "fused":
                _logp, _ = fused_token_logprobs(h, w, tokens, chunk=4, with_entropy=True, backend="torch")
            else:
                _logp, _ = naive_linear_logprobs(h, w, tokens)
        logits_sized = [n for n in saved_sizes if n >= B * T * vocab]
        if fn == "fused":  # the weight [V, H] is saved, the logits [B*T, V] are not
            assert max(saved_sizes) == vocab * H and not logits_sized
        else:  # the check has teeth: log_softmax + gather saves its [B, T, V] output
            assert logits_sized


def test_fused_works_under_inference_mode():
    hidden, weight, tokens = random_hidden(seed=21)
    with torch.inference_mode():
        logp, entropy = fused_token_logprobs(hidden, weight, tokens, chunk=3, with_entropy=True)
    expected, expected_entropy = naive_linear_logprobs(hidden, weight, tokens)
    torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)


def test_unknown_backend_names_the_choices():
    hidden, weight, tokens = random_hidden()
    with pytest.raises(ValueError, match="auto, torch, triton"):
        fused_token_logprobs(hidden, weight, tokens, backend="cuda")


def test_default_chunk_fits_the_budget():
    assert default_chunk_rows(49152) == 170  # 32 MiB of fp32 rows at SmolLM2's vocabulary
    assert default_chunk_rows(10**9) == 16
    assert chunk_budget("cpu") == chunk_budget(None) == CHUNK_BYTES
    # on a GPU: ~1000 rows per read of the 8B model's lm_head, not 65
    assert default_chunk_rows(128256, CUDA_CHUNK_BYTES) == 1046


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
        logp, entropy = completion_logprobs(
            tiny_model, input_ids, attention_mask, TC, temperature=temperature, with_entropy=True
        )
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
