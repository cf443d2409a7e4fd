"""Packed passes against the padded ones: the layout and the bin assignment by hand; log-probs, entropies,
values, reward scores and every parameter's gradient equal on mixed lengths with EOS in the middle, for
G = 1 (every prompt distinct) and G > 1 (shared prompts), at budgets that split groups and rows."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from models.forward import completion_hidden, packed_passes, tally_passes
from models.heads import RewardModel, ValueModel
from models.logprobs import completion_logprobs
from models.padding_free import assign_bins, balanced_micro_batches, build_units, pack, packed_hidden

TC = 9


def mixed_batch(pad_id: int, group_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of 2-7 tokens (left-padded) with `group_size` completions each of 0-9 tokens: some end early
    (EOS in the middle of the width, then padding), one runs to the width (truncated)."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [7, 2, 5, 3]
    completion_lens = [9, 3, 0, 6, 1, 9, 4, 2][: len(prompt_lens) * group_size]
    while len(completion_lens) < len(prompt_lens) * group_size:
        completion_lens.append(int(torch.randint(1, TC + 1, (1,), generator=g)))
    tp = max(prompt_lens)
    ids, mask = [], []
    for p_idx, p in enumerate(prompt_lens):
        prompt = torch.randint(3, 500, (p,), generator=g).tolist()
        for j in range(group_size):
            c = completion_lens[p_idx * group_size + j]
            completion = torch.randint(3, 500, (c,), generator=g).tolist()
            ids.append([pad_id] * (tp - p) + prompt + completion + [pad_id] * (TC - c))
            mask.append([0] * (tp - p) + [1] * (p + c) + [0] * (TC - c))
    return torch.tensor(ids), torch.tensor(mask)


def test_units_split_a_group_where_its_prompt_and_completions_pass_the_budget():
    units = build_units([0, 0, 0, 1, 0], [4, 4, 4, 2, 4], [3, 5, 1, 9, 0], budget=10)
    # 4 + 3, + 5 passes 10: a new unit 4 + 5, + 1 = 10 fits, + 0 fits; the lone 2 + 9 is over but whole
    assert [(u.prompt, u.members, u.tokens) for u in units] == [(0, [0], 7), (1, [1, 2, 4], 10), (3, [3], 11)]


def test_bins_by_hand():
    # total 20 over budget 10: two bins. Into the lightest: 6 | 5, 4 -> 5's (9), 3 -> 6's (9), 2 fits neither;
    # first fit: 6 + 4 | 5 + 3 + 2
    assert assign_bins([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert assign_bins([6, 5, 4, 3], 10) == [[0, 3], [1, 2]]  # into the lightest: 9 | 9
    # balancing needs three bins here (5+4 | 5+4 | 2), first-fit decreasing two: 5+5 | 4+4+2
    assert assign_bins([5, 5, 4, 4, 2], 10) == [[0, 1], [2, 3, 4]]
    assert assign_bins([12, 3, 3], 10) == [[0], [1, 2]]  # over the budget: a bin of its own
    assert assign_bins([], 10) == []
    assert assign_bins([0, 0], 10) == [[0, 1]]


def test_the_layout_by_hand():
    # two sequences sharing a 2-token prompt (completions of 2 and 1 tokens), one of its own (1 + 1)
    ids = torch.tensor([[7, 8, 20, 21], [7, 8, 30, 0], [0, 9, 40, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 0]])
    layout = pack(ids, mask, prompt_len=2, budget=16)
    assert layout.input_ids.tolist() == [[7, 8, 20, 21, 30, 9, 40]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert (layout.forwarded, layout.real, layout.prompt_repeats_avoided) == (7, 7, 2)
    allowed = layout.mask()[0, 0].int().tolist()
    assert allowed[4] == [1, 1, 0, 0, 1, 0, 0]  # completion 2 sees its prompt and itself, not completion 1
    assert allowed[3] == [1, 1, 1, 1, 0, 0, 0]
    assert allowed[6] == [0, 0, 0, 0, 0, 1, 1]  # the other unit sees nothing of the first
    # every padded position maps to its packed token; the shared prompt is read by both sequences
    assert layout.source.view(3, 4).tolist() == [[0, 1, 2, 3], [0, 1, 4, -1], [-1, 5, 6, -1]]
    # what unit attention runs: (prompt start, length, [(completion start, length)]) per unit of the row
    assert layout.units == [[(0, 2, [(2, 2), (4, 1)]), (5, 1, [(6, 1)])]]


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("budget", [12, 40, 1000])
def test_packed_logprobs_entropies_and_gradients_equal_the_padded_pass(tiny_model, tokenizer, group_size, budget):
    input_ids, attention_mask = mixed_batch(tokenizer.pad_token_id, group_size)
    weights = torch.randn(input_ids.shape[0], TC, generator=torch.Generator().manual_seed(1))
    tiny_model.train()
    results = []
    for packed in (0, budget):
        tiny_model.zero_grad(set_to_none=True)
        with packed_passes(packed), tally_passes() as tally:
            logp, entropy = completion_logprobs(
                tiny_model, input_ids, attention_mask, TC, temperature=0.7, with_entropy=True, entropy_grad=True
            )
            assert entropy is not None
            ((logp + 0.1 * entropy) * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), entropy.detach(), grads, tally.metrics()))
    (logp, entropy, grads, padded_tally), (p_logp, p_entropy, p_grads, packed_tally) = results
    torch.testing.assert_close(p_logp, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_entropy, entropy, atol=1e-5, rtol=1e-5)
    assert (p_logp[attention_mask[:, -TC:] == 0] == 0).all()
    assert grads.keys() == p_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(p_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # packed: nothing forwarded but real tokens and the padding at rows' ends
    real = attention_mask.sum().item()
    assert packed_tally["compute/pass_real_tokens"] + packed_tally["compute/pass_prompt_repeats_avoided"] == real
    if budget == 1000:  # one row: no padding at all
        assert packed_tally["compute/pass_padding_frac"] == 0.0
    assert packed_tally["compute/pass_forward_tokens"] < padded_tally["compute/pass_forward_tokens"]


def test_packed_values_and_reward_scores_equal_the_padded_pass(tiny_model, tokenizer):
    input_ids, attention_mask = mixed_batch(tokenizer.pad_token_id, 2)
    critic = ValueModel.from_causal_lm(tiny_model)
    torch.nn.init.normal_(critic.head.weight, std=0.1)
    rm = RewardModel(tiny_model.model)
    with torch.no_grad():
        values = critic.values(input_ids, attention_mask, TC)
        scores = rm.score(input_ids, attention_mask)
        with packed_passes(24):
            packed_values = critic.values(input_ids, attention_mask, TC)
            packed_scores = rm.score(input_ids, attention_mask)
    real = attention_mask[:, -TC:].bool()
    torch.testing.assert_close(packed_values[real], values[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_scores, scores, atol=1e-5, rtol=1e-5)


def test_micro_batches_hold_the_budget_keep_groups_whole_and_cover_the_batch(tokenizer):
    input_ids, attention_mask = mixed_batch(tokenizer.pad_token_id, 2)
    tp = input_ids.shape[1] - TC
    parts = balanced_micro_batches(input_ids, attention_mask, tp, budget=20)
    assert sorted(torch.cat(parts).tolist()) == list(range(input_ids.shape[0]))
    prompt_lens, completion_lens = attention_mask[:, :tp].sum(1), attention_mask[:, tp:].sum(1)
    for part in parts:
        groups = {int(i) // 2 for i in part}
        cost = sum(int(prompt_lens[2 * g]) for g in groups) + int(completion_lens[part].sum())
        assert cost <= 20 or len(part) == 1
    assert len(parts) == len(balanced_micro_batches(input_ids, attention_mask, tp, budget=20))
    assert len(balanced_micro_batches(input_ids, attention_mask, tp, budget=10_000)) == 1


def test_eager_attention_takes_an_additive_mask_and_an_unknown_one_is_refused(tiny_model, tokenizer):
    input_ids, attention_mask = mixed_batch(tokenizer.pad_token_id, 2)
    with torch.no_grad():
        padded, _ = completion_logprobs(tiny_model, input_ids, attention_mask, TC)
        tiny_model.config._attn_implementation = "eager"
        try:
            with packed_passes(30):
                eager, _ = completion_logprobs(tiny_model, input_ids, attention_mask, TC)
            tiny_model.config._attn_implementation = "paged_attention"
            refused = re.escape("attn_implementation sdpa | eager | flash")
            with packed_passes(30), pytest.raises(ValueError, match=refused):
                completion_logprobs(tiny_model, input_ids, attention_mask, TC)
        finally:
            tiny_model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(eager, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("budget", [12, 1000])
def test_unit_attention_equals_the_dense_mask_and_is_sdpa_elsewhere(tiny_model, tokenizer, group_size, budget):
    """unit_sdpa computes a prompt's and each completion's attention over their own keys only: in float64 the
    hidden states and every gradient equal the dense-mask SDPA pass's to 1e-10 (in fp32 both differ from float64
    by rounding, ~3e-7 of the gradient's scale); a decoder switched to it runs padded passes as sdpa does."""
    input_ids, attention_mask = mixed_batch(tokenizer.pad_token_id, group_size)
    model = copy.deepcopy(tiny_model).double()
    model.config._attn_implementation = "sdpa"
    decoder = model.get_decoder()
    tp = input_ids.shape[1] - TC
    weights = torch.randn(
        *input_ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    with torch.no_grad():
        padded_before = completion_hidden(decoder, input_ids, attention_mask, TC)
    results = []
    for dense in (True, False):
        model.zero_grad(set_to_none=True)
        hidden, _ = packed_hidden(decoder, input_ids, attention_mask, tp, budget, dense_mask=dense)
        (hidden * weights * attention_mask[..., None]).sum().backward()
        grads = {n: p.grad.clone() for n, p in decoder.named_parameters() if p.grad is not None}
        results.append((hidden.detach(), grads))
    assert model.config._attn_implementation == "unit_sdpa"
    (dense_hidden, dense_grads), (unit_hidden, unit_grads) = results
    real = attention_mask.bool()
    torch.testing.assert_close(unit_hidden[real], dense_hidden[real], atol=1e-10, rtol=1e-10)
    assert dense_grads.keys() == unit_grads.keys()
    for name, grad in dense_grads.items():
        torch.testing.assert_close(unit_grads[name], grad, atol=1e-10, rtol=1e-10, msg=name)
    with torch.no_grad():
        padded_after = completion_hidden(decoder, input_ids, attention_mask, TC)
    torch.testing.assert_close(padded_after, padded_before, atol=0, rtol=0)


@pytest.mark.parametrize("budget", [12, 40, 1000])
def test_sequence_bounds_by_position_ids_equal_the_padded_pass(tiny_model, tokenizer, budget):
    """The layout flash attention's varlen kernels get (whole sequences, no mask: transformers reads the bounds
    from position ids that restart), run here through SDPA, which builds its mask from the same position ids."""
    input_ids, attention_mask = mixed_batch(tokenizer.pad_token_id, 3)
    decoder = tiny_model.get_decoder()
    tp = input_ids.shape[1] - TC
    with torch.no_grad():
        plain = completion_hidden(decoder, input_ids, attention_mask, TC, share_prompts=False)
        hidden, layout = packed_hidden(decoder, input_ids, attention_mask, tp, budget, by_positions=True)
    real = attention_mask[:, -TC:].bool()
    torch.testing.assert_close(hidden[:, -TC - 1 : -1][real], plain[real], atol=1e-5, rtol=1e-5)
    assert layout.prompt_repeats_avoided == 0  # every sequence whole, its prompt with it
