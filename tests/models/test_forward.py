"""The shared-prompt decoder pass against the plain full-sequence pass: hidden states, log-probs and
parameter gradients, on a tiny Llama with repeated, left-padded prompts and right-padded completions."""

from __future__ import annotations

import pytest
import torch

from models.forward import completion_hidden, set_prefill_agreement, tally_passes
from models.logprobs import completion_logprobs

PROMPTS = [[19556, 905, 28], [638, 359, 346, 47, 905, 19556]]  # lengths 3 and 6
COMPLETIONS = [[11, 2000, 345, 7], [88, 99, 4000, 12], [5, 6, 7, 0], [400, 1, 0, 0], [42, 43, 44, 45]]
GROUP_OF = [0, 1, 0, 1, 0]  # which prompt each completion continues: prompt 0 three times, prompt 1 twice
TC = 4


def batch(pad_id):
    width = max(len(p) for p in PROMPTS)
    ids, attn = [], []
    for completion, g in zip(COMPLETIONS, GROUP_OF):
        prompt, pad = PROMPTS[g], width - len(PROMPTS[g])
        real = [int(c != 0) for c in completion]  # 0 marks padding after the end of a completion
        ids.append([pad_id] * pad + prompt + [c if r else pad_id for c, r in zip(completion, real)])
        attn.append([0] * pad + [1] * len(prompt) + real)
    return torch.tensor(ids), torch.tensor(attn)


def test_shared_prefix_hidden_equals_the_plain_pass(tiny_model, tokenizer):
    input_ids, attention_mask = batch(tokenizer.pad_token_id)
    decoder = tiny_model.get_decoder()
    with torch.no_grad():
        shared = completion_hidden(decoder, input_ids, attention_mask, TC, share_prompts=True)
        plain = completion_hidden(decoder, input_ids, attention_mask, TC, share_prompts=False)
    real = attention_mask[:, -TC:].bool()
    assert shared.shape == plain.shape == (len(COMPLETIONS), TC, tiny_model.config.hidden_size)
    torch.testing.assert_close(shared[real], plain[real], atol=1e-5, rtol=1e-5)


def test_shared_prefix_logprobs_and_gradients_equal_the_plain_pass(tiny_model, tokenizer):
    input_ids, attention_mask = batch(tokenizer.pad_token_id)
    weights = torch.randn(len(COMPLETIONS), TC, generator=torch.Generator().manual_seed(0))
    results = {}
    tiny_model.train()  # as in the update
    for share in (True, False):
        tiny_model.zero_grad(set_to_none=True)
        logp, entropy = completion_logprobs(
            tiny_model, input_ids, attention_mask, TC, temperature=0.7, with_entropy=True, share_prompts=share
        )
        (logp * weights).sum().backward()
        results[share] = logp.detach(), entropy, {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    (logp, entropy, grads), (plain_logp, plain_entropy, plain_grads) = results[True], results[False]
    torch.testing.assert_close(logp, plain_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, plain_entropy, atol=1e-5, rtol=1e-5)
    assert (logp[attention_mask[:, -TC:] == 0] == 0).all()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # the prompt's embeddings get gradient through the shared cache
    embed = tiny_model.get_input_embeddings().weight.grad
    assert embed[PROMPTS[1][0]].abs().sum() > 0


@pytest.fixture()
def agreement():
    """Registers an agreement (as parallel.fsdp does) that answers `decision` and records what it was asked."""
    asked: list[bool] = []
    decision = {"share": True}

    def agree(share: bool) -> bool:
        asked.append(share)
        return decision["share"]

    set_prefill_agreement(agree)
    yield asked, decision
    set_prefill_agreement(None)


def count_decoder_passes(decoder) -> list[int]:
    calls = [0]
    decoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_registered_agreement_decides_whether_prompts_share_a_prefill(tiny_model, tokenizer, agreement):
    asked, decision = agreement
    input_ids, attention_mask = batch(tokenizer.pad_token_id)
    decoder = tiny_model.get_decoder()
    passes = count_decoder_passes(decoder)
    with torch.no_grad():
        plain = completion_hidden(decoder, input_ids, attention_mask, TC, share_prompts=False)
        assert asked == [] and passes[0] == 1  # nothing to agree on without sharing

        decision["share"] = False  # another rank has no repeated prompts: the plain pass, one decoder call
        vetoed = completion_hidden(decoder, input_ids, attention_mask, TC)
        assert asked == [True] and passes[0] == 2

        # this rank's prompts are all distinct, another rank's repeat: prefill, then completions
        distinct = [0, 1]
        decision["share"] = True
        shared = completion_hidden(decoder, input_ids[distinct], attention_mask[distinct], TC)
        assert asked == [True, False] and passes[0] == 4
    real = attention_mask[:, -TC:].bool()
    torch.testing.assert_close(vetoed, plain)
    torch.testing.assert_close(shared[real[distinct]], plain[distinct][real[distinct]], atol=1e-5, rtol=1e-5)


def test_the_pass_tally_counts_what_ran_padding_and_the_prompts_shared(tiny_model, tokenizer):
    # Tp = 6, Tc = 4, B = 5; real prompt tokens 3 + 6 + 3 + 6 + 3 = 21, real completion tokens 4 + 4 + 3 + 2 + 4 = 17
    input_ids, attention_mask = batch(tokenizer.pad_token_id)
    decoder = tiny_model.get_decoder()
    params = sum(p.numel() for p in decoder.parameters())
    with torch.no_grad(), tally_passes() as shared:
        completion_hidden(decoder, input_ids, attention_mask, TC, share_prompts=True)
    # two distinct prompts prefilled once each (2 x 6 positions, 9 real), then 5 x 4 completion positions
    assert shared.metrics() == {
        "compute/pass_forward_tokens": 32,
        "compute/pass_real_tokens": 26,
        "compute/pass_padding_frac": pytest.approx(6 / 32),
        "compute/pass_prompt_repeats_avoided": 12,
        "compute/pass_flops": 2 * params * 32,  # forward only
    }
    with torch.no_grad(), tally_passes() as plain, tally_passes() as inner:
        completion_hidden(decoder, input_ids, attention_mask, TC, share_prompts=False)
    assert (
        plain.metrics()
        == inner.metrics()
        == {
            "compute/pass_forward_tokens": 50,
            "compute/pass_real_tokens": 38,
            "compute/pass_padding_frac": pytest.approx(12 / 50),
            "compute/pass_prompt_repeats_avoided": 0,
            "compute/pass_flops": 2 * params * 50,
        }
    )
    with tally_passes() as trained:  # grad enabled on trainable weights: a backward follows
        completion_hidden(decoder, input_ids, attention_mask, TC, share_prompts=False)
    assert trained.metrics()["compute/pass_flops"] == 6 * params * 50
    with tally_passes() as idle:
        pass
    assert idle.metrics() == {}
