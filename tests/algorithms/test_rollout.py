"""Rollout: group layout, EOS masks, and sampling-time log-probs equal to a fresh forward pass."""

from __future__ import annotations

import torch

from algorithms.common import batched_logprobs
from algorithms.rollout import generate_rollout, stop_token_ids, top_p_filter


def chat_rows(tokenizer, questions):
    return [{"prompt": tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True), "q": q} for q in questions]


def test_rollout_layout_masks_and_logprobs(tiny_model, tokenizer):
    rows = chat_rows(tokenizer, ["Hi.", "A much longer question, so that left padding is needed here."])
    rollout = generate_rollout(tiny_model, tokenizer, rows, group_size=3, max_new_tokens=10,
                               generator=torch.Generator().manual_seed(0))
    assert rollout.completion_ids.shape[0] == 6
    assert [r["q"] for r in rollout.rows] == ["Hi."] * 3 + [rows[1]["q"]] * 3  # group-contiguous
    assert rollout.prompts[0] == rows[0]["prompt"] and rollout.prompts[3] == rows[1]["prompt"]
    # the short prompt is left-padded: padding at the start, the prompt's last token at the end
    assert rollout.prompt_mask[0, 0] == 0 and rollout.prompt_mask[0, -1] == 1
    # sampling-time log-probs (KV cache, shared prefill) equal a full forward on prompt + completion
    recomputed = batched_logprobs(tiny_model, rollout, micro_batch_size=4, temperature=1.0)
    real = rollout.completion_mask.bool()
    torch.testing.assert_close(recomputed[real], rollout.logp[real], atol=1e-4, rtol=1e-4)
    assert (rollout.logp[~real] == 0).all()


def test_completion_mask_stops_after_eos(tiny_model, tokenizer):
    eos = stop_token_ids(tokenizer, tiny_model)[0]
    # an EOS logit bias of +12 (about a 3/4 chance per token): most samples stop early, a few never do
    tiny_model.lm_head = torch.nn.Linear(64, tiny_model.lm_head.out_features, bias=True)
    with torch.no_grad():
        tiny_model.lm_head.weight.copy_(tiny_model.model.embed_tokens.weight)
        tiny_model.lm_head.bias.zero_()
        tiny_model.lm_head.bias[eos] = 12.0
    rollout = generate_rollout(tiny_model, tokenizer, chat_rows(tokenizer, ["Hi."]), group_size=16,
                               max_new_tokens=3, generator=torch.Generator().manual_seed(1))
    assert rollout.truncated.any(), "every sample stopped: the no-EOS branch below would be vacuous"
    assert (~rollout.truncated).any(), "no sample stopped: the check below would be vacuous"
    for ids, mask, truncated in zip(rollout.completion_ids, rollout.completion_mask, rollout.truncated):
        hits = (ids == eos).nonzero()
        if len(hits):
            first = int(hits[0])
            assert mask[: first + 1].all() and not mask[first + 1 :].any()  # EOS itself is trained on
            assert not truncated
        else:
            assert mask.all() and truncated


def test_rollout_is_deterministic_given_a_generator(tiny_model, tokenizer):
    rows = chat_rows(tokenizer, ["Hi.", "Why?"])
    a = generate_rollout(tiny_model, tokenizer, rows, 2, 8, generator=torch.Generator().manual_seed(3))
    b = generate_rollout(tiny_model, tokenizer, rows, 2, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.completion_ids, b.completion_ids) and a.completions == b.completions


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)
