"""Value and reward heads: which positions they read, padding invariance, save/load, the scorer."""

from __future__ import annotations

import torch

from models.heads import RewardModel, ValueModel, encode_texts
from rewards import CombinedReward
from rewards.reward_model import RewardModelScorer


def test_value_head_starts_at_zero_and_reads_the_logprob_slice(tiny_model):
    critic = ValueModel.from_causal_lm(tiny_model)
    ids = torch.randint(0, 1000, (2, 7))
    mask = torch.ones_like(ids)
    assert torch.equal(critic.values(ids, mask, 3), torch.zeros(2, 3))  # zero head: V = 0 before training
    torch.nn.init.normal_(critic.head.weight)
    per_position = critic(ids, mask)  # [2, 7]
    # value of completion token t = the position whose next token is t, like completion_logprobs
    torch.testing.assert_close(critic.values(ids, mask, 3), per_position[:, -4:-1])
    assert critic.values(ids, mask, 3).dtype == torch.float32


def test_critic_is_a_copy_of_the_policy_backbone(tiny_model):
    critic = ValueModel.from_causal_lm(tiny_model)
    with torch.no_grad():
        next(critic.backbone.parameters()).add_(1.0)
    assert not torch.equal(next(critic.backbone.parameters()), next(tiny_model.get_decoder().parameters()))


def test_reward_score_reads_the_last_real_token_whatever_the_padding(tiny_model, tokenizer):
    rm = RewardModel.from_causal_lm(tiny_model)
    short = encode_texts(tokenizer, ["Hi "], ["there"], "cpu")
    both = encode_texts(tokenizer, ["Hi ", "A much longer prompt "], ["there", "and its answer"], "cpu")
    assert both["attention_mask"][0, 0] == 0  # the short one is left-padded
    torch.testing.assert_close(rm.score(**both)[0], rm.score(**short)[0], atol=1e-5, rtol=1e-4)
    # right padding (a completion's pads after EOS): the same score
    ids = torch.cat([short["input_ids"], torch.zeros(1, 2, dtype=torch.long)], dim=1)
    mask = torch.cat([short["attention_mask"], torch.zeros(1, 2, dtype=torch.long)], dim=1)
    torch.testing.assert_close(rm.score(ids, mask), rm.score(**short), atol=1e-5, rtol=1e-4)


def test_reward_model_round_trip_and_scorer(tiny_model, tokenizer, tmp_path):
    rm = RewardModel.from_causal_lm(tiny_model).eval()
    rm.save(tmp_path / "rm", tokenizer)
    scorer = RewardModelScorer.from_path(tmp_path / "rm", batch_size=2)
    prompts, completions = ["Q1 ", "Q2 ", "Q3 "], ["yes", "no", "maybe so"]
    with torch.no_grad():
        expected = rm.score(**encode_texts(tokenizer, prompts, completions, "cpu"))
    scores = scorer(prompts, completions, answer=[None] * 3)  # data columns are accepted and ignored
    assert isinstance(scores, list) and len(scores) == 3
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-5, rtol=1e-4)
    combined = CombinedReward({"reward_model": 1.0}, extra={"reward_model": scorer})
    out = combined(prompts, completions, [{"answer": "x"}] * 3)
    torch.testing.assert_close(out.total, expected, atol=1e-5, rtol=1e-4)
    assert scorer([], []) == []
