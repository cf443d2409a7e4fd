"""Micro-batches balanced by tokens, run packed, train on the gradient of the padded path: for every loss_type
(with an entropy bonus) and for PPO's critic, whatever the token budget; and the old log-probs of a rollout do
not depend on how its passes are cut, beyond float rounding."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from algorithms.common import batched_logprobs, rollout_tensors
from algorithms.grpo import GRPOConfig, build_grpo
from algorithms.ppo import PPOConfig, build_ppo
from algorithms.rollout import generate_rollout
from conf.schema import TrainerConfig
from models.forward import packed_passes
from models.padding_free import set_micro_batch_agreement
from tests.conftest import Recorder, say_rows, stage_context
from training.update import MicroBatch

# 4 prompts x G=3, 12 new tokens at temperature 1.5 on the tiny model: lengths differ, some stop early at EOS
SETTING = dict(prompts_per_step=4, group_size=3, minibatch_size=12, max_new_tokens=12, temperature=1.5, ent_coef=0.01)
UNBOUNDED = TrainerConfig(max_grad_norm=1e9)  # no clipping: the gradients themselves are compared


@pytest.fixture()
def eos_prone(tiny_model, tokenizer):
    """The tiny model with its EOS logit raised along the mean direction of its last hidden states, so that
    completions stop at EOS after one or a few tokens or run to the cap: lengths differ (a random model over
    49,152 tokens would never stop)."""
    ids = tokenizer(say_rows(tokenizer, 4)[0]["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = tiny_model.get_decoder()(input_ids=ids).last_hidden_state[0]  # [T, H]
        direction = hidden.mean(0)
        row = tiny_model.get_output_embeddings().weight[tokenizer.eos_token_id]
        row.copy_(direction * 11.0 / float((hidden @ direction).mean()))  # lengths 1 to 12 at the setting below
    return tiny_model


def step_gradients(builder, cfg, model, tokenizer, reward, micro: MicroBatch) -> list[torch.Tensor]:
    """The gradients one step (one minibatch) of the algorithm accumulates, at the given micro-batching."""
    torch.manual_seed(0)
    ctx = stage_context(copy.deepcopy(model), tokenizer, cfg, reward, train_rows=say_rows(tokenizer), trainer=UNBOUNDED)
    built = builder(ctx)
    algo = built.algorithm
    algo.micro_batch = micro
    recorders = []
    for target in algo.targets:
        target.optimizer = Recorder(target.params)
        recorders.append(target.optimizer)
    with packed_passes(micro.tokens):
        algo.step(built.sampler.draw())
    return [g for r in recorders for g in r.grads[0]]


def assert_same_gradients(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    scale = max(float(g.abs().max()) for g in want)
    assert scale > 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_every_loss_type_trains_on_the_padded_gradient_whatever_the_token_budget(
    loss_type, eos_prone, tokenizer, letter_e_reward
):
    cfg = GRPOConfig(**SETTING, loss_type=loss_type, beta=0.05)
    args = (build_grpo, cfg, eos_prone, tokenizer, letter_e_reward)
    # the padded path with one micro-batch: a token mean is the minibatch's
    padded = step_gradients(*args, MicroBatch(12))
    for budget in (40, 90, 10_000):  # many micro-batches, a few, one
        assert_same_gradients(step_gradients(*args, MicroBatch(12, tokens=budget)), padded)
    if loss_type != "bnpo":
        # without the entropy bonus (a mean over the micro-batch's tokens on the padded path), a per-sequence
        # mean and dapo's minibatch tokens do not depend on the padded micro-batches either (bnpo's mean of
        # micro-batch token means does, as TRL's; under a token budget it is the minibatch's token mean)
        cfg = dataclasses.replace(cfg, ent_coef=0.0)
        args = (build_grpo, cfg, eos_prone, tokenizer, letter_e_reward)
        assert_same_gradients(step_gradients(*args, MicroBatch(12, tokens=40)), step_gradients(*args, MicroBatch(5)))


def test_ppo_actor_and_critic_train_on_the_padded_gradient(eos_prone, tokenizer, letter_e_reward):
    cfg = PPOConfig(**{**SETTING, "group_size": 1, "prompts_per_step": 12})
    args = (build_ppo, cfg, eos_prone, tokenizer, letter_e_reward)
    padded = step_gradients(*args, MicroBatch(12))
    assert_same_gradients(step_gradients(*args, MicroBatch(12, tokens=60)), padded)


def test_old_logprobs_do_not_depend_on_how_the_passes_are_cut(eos_prone, tokenizer):
    generator = torch.Generator().manual_seed(0)
    rollout = generate_rollout(eos_prone, tokenizer, say_rows(tokenizer, 4), 3, 12, 1.5, generator=generator)
    real = rollout.completion_mask.bool()
    assert len(set(real.sum(1).tolist())) > 1  # mixed lengths
    cuts = {"padded 12": MicroBatch(12), "padded 1": MicroBatch(1), "40": MicroBatch(1, tokens=40)}
    cuts["1000"] = MicroBatch(1, tokens=1000)
    results = {}
    for label, micro in cuts.items():
        with packed_passes(micro.tokens):
            results[label] = batched_logprobs(eos_prone, rollout, micro, 1.0)
    base = results["padded 12"]
    for label, logp in results.items():
        assert (logp[~real] == 0).all()
        assert float((logp - base)[real].abs().max()) < 1e-5, label


def test_ranks_that_must_agree_cut_as_many_micro_batches(eos_prone, tokenizer):
    generator = torch.Generator().manual_seed(0)
    rollout = generate_rollout(eos_prone, tokenizer, say_rows(tokenizer, 4), 3, 12, 1.5, generator=generator)
    batch = rollout_tensors(rollout)
    idx = torch.arange(12)
    micro = MicroBatch(1, tokens=10_000)
    assert len(micro.split(batch, idx)) == 1
    set_micro_batch_agreement(lambda count: max(count, 5))  # another rank cut five
    try:
        parts = micro.split(batch, idx)
        assert len(parts) == 5 and sorted(torch.cat(parts).tolist()) == list(range(12))
        with pytest.raises(RuntimeError, match="the ranks run 13 micro-batches, but this rank holds 12"):
            set_micro_batch_agreement(lambda count: 13)
            micro.split(batch, idx)
    finally:
        set_micro_batch_agreement(None)
