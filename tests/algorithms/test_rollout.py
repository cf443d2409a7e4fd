"""Rollout: group layout, EOS masks, and sampling-time log-probs equal to a fresh forward pass."""

from __future__ import annotations

import pytest
import torch

from algorithms.common import batched_logprobs
from algorithms.policy_gradient import PolicyGradientConfig
from algorithms.rollout import RolloutConfig, _compiled, generate_rollout, stop_token_ids, top_p_filter
from conf.checks import ConfigError
from conf.schema import LoraOptions
from models.decode import sample_token
from models.lora import apply_lora
from models.packed import onednn_packs


def chat_rows(tokenizer, questions):
    return [
        {
            "prompt": tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
            "q": q,
        }
        for q in questions
    ]


def test_rollout_layout_masks_and_logprobs(tiny_model, tokenizer):
    rows = chat_rows(tokenizer, ["Hi.", "A much longer question, so that left padding is needed here."])
    rollout = generate_rollout(
        tiny_model, tokenizer, rows, group_size=3, max_new_tokens=10, generator=torch.Generator().manual_seed(0)
    )
    assert rollout.completion_ids.shape[0] == 6
    assert [r["q"] for r in rollout.rows] == ["Hi."] * 3 + [rows[1]["q"]] * 3  # group-contiguous
    assert rollout.prompts[0] == rows[0]["prompt"] and rollout.prompts[3] == rows[1]["prompt"]
    # the short prompt is left-padded: padding at the start, the prompt's last token at the end
    assert rollout.prompt_mask[0, 0] == 0 and rollout.prompt_mask[0, -1] == 1
    # sampling-time log-probs (KV cache, shared prefill) equal a full forward on prompt + completion
    recomputed = batched_logprobs(tiny_model, rollout, 4, temperature=1.0)
    real = rollout.completion_mask.bool()
    torch.testing.assert_close(recomputed[real], rollout.logp[real], atol=1e-4, rtol=1e-4)
    assert (rollout.logp[~real] == 0).all()


def eos_biased(model, tokenizer, bias: float) -> int:
    """Give `model` an lm_head with a bias of `bias` on EOS; returns the EOS id."""
    eos = stop_token_ids(tokenizer, model)[0]
    model.lm_head = torch.nn.Linear(64, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        model.lm_head.bias.zero_()
        model.lm_head.bias[eos] = bias
    return eos


def test_completion_mask_stops_after_eos(tiny_model, tokenizer):
    # an EOS logit bias of +10 (about a 1/3 chance per token): some samples stop early, some never do
    eos = eos_biased(tiny_model, tokenizer, 10.0)
    rollout = generate_rollout(
        tiny_model,
        tokenizer,
        chat_rows(tokenizer, ["Hi."]),
        group_size=16,
        max_new_tokens=3,
        generator=torch.Generator().manual_seed(1),
    )
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


def decode(model, tokenizer, cfg: RolloutConfig, max_new_tokens: int = 16):
    rows = chat_rows(tokenizer, ["Hi.", "A much longer question, so that left padding is needed here.", "Why?"])
    return generate_rollout(model, tokenizer, rows, 4, max_new_tokens, prompt_seeds=[5, 6, 7], rollout=cfg)


def assert_same_draws(got, reference):
    assert torch.equal(got.completion_ids, reference.completion_ids)
    assert torch.equal(got.completion_mask, reference.completion_mask)
    torch.testing.assert_close(got.logp, reference.logp, atol=1e-5, rtol=0)


def test_static_cache_chunks_and_compaction_draw_what_the_dynamic_cache_draws(tiny_model, tokenizer):
    eos_biased(tiny_model, tokenizer, 9.0)  # about 1 in 7 per token: samples stop at many different steps
    reference = decode(tiny_model, tokenizer, RolloutConfig(cache="dynamic"))
    lengths = reference.completion_lengths
    assert lengths.min() < 8 and reference.truncated.any(), "no long tail: compaction would not be exercised"
    for cfg in (
        RolloutConfig(compile="false", compact_below=0.0, pack="false"),  # static cache, model's modules
        RolloutConfig(compile="false", compact_below=0.0, pack="true"),  # on oneDNN-packed weights
        RolloutConfig(compile="false", pack="false"),  # + compaction at half the batch
        RolloutConfig(compile="false", compact_below=0.99),  # compaction as soon as one row stops
        RolloutConfig(compile="false", max_batch=5),  # chunks that split a group
        RolloutConfig(compile="false", max_batch=2, compact_below=0.99),
        RolloutConfig(compile="false", stop_check_every=3, compact_below=0.99),  # looks every 3rd step
        RolloutConfig(compile="false", stop_check_every=5, max_batch=5),
    ):
        assert_same_draws(decode(tiny_model, tokenizer, cfg), reference)


def test_compiled_step_draws_what_the_eager_step_draws(tiny_model, tokenizer):
    eos_biased(tiny_model, tokenizer, 9.0)
    eager = decode(tiny_model, tokenizer, RolloutConfig(compile="false", pack="false"), max_new_tokens=8)
    assert_same_draws(decode(tiny_model, tokenizer, RolloutConfig(compile="true"), max_new_tokens=8), eager)
    # a later rollout with other prompts (another prompt length, another draw) runs in the kept cache, on the graph
    # already compiled for the full batch: no recompile, and the same memory (what a CUDA graph replays on)
    decoder = _compiled[tiny_model]["default"]
    memory = decoder._storage.keys(0).data_ptr()
    rows = chat_rows(tokenizer, ["Yes?", "And a second, rather longer question than any of the others.", "No."])
    no_compaction = RolloutConfig(compile="true", compact_below=0.0, stop_check_every=3)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = generate_rollout(tiny_model, tokenizer, rows, 4, 8, prompt_seeds=[8, 9, 10], rollout=no_compaction)
    assert decoder._storage.keys(0).data_ptr() == memory
    # and a CUDA graph would take the cache's views (compaction's included) as static: no copy of it per replay
    assert all(getattr(b, "_dynamo_static_input_type", None) == "unguarded" for b in decoder._storage.rows(2).buffers())
    assert_same_draws(
        got,
        generate_rollout(
            tiny_model,
            tokenizer,
            rows,
            4,
            8,
            prompt_seeds=[8, 9, 10],
            rollout=RolloutConfig(compile="false", pack="false"),
        ),
    )


def test_packed_weights_follow_updates_and_refuse_adapters(tiny_model, tokenizer):
    packed = RolloutConfig(compile="false", pack="true")
    before = decode(tiny_model, tokenizer, packed)
    with torch.no_grad():  # a training update between rollouts: the next pack must read the new weights
        for layer in tiny_model.model.layers:
            layer.mlp.down_proj.weight.mul_(3.0)
    after = decode(tiny_model, tokenizer, packed)
    assert not torch.equal(after.logp, before.logp)
    assert_same_draws(after, decode(tiny_model, tokenizer, RolloutConfig(compile="false", pack="false")))
    policy = apply_lora(tiny_model, LoraOptions(rank=4, alpha=8))
    with pytest.raises(ConfigError, match=r"not a plain nn\.Linear"):
        decode(policy, tokenizer, packed)
    # auto falls back to the modules (the adapters are part of the policy)
    assert_same_draws(
        decode(policy, tokenizer, RolloutConfig(compile="false")),
        decode(policy, tokenizer, RolloutConfig(cache="dynamic")),
    )


def test_packed_bf16_weights_draw_what_the_modules_draw(tiny_model, tokenizer):
    model = tiny_model.to(torch.bfloat16)
    if not onednn_packs(torch.bfloat16):  # an AVX2-only CPU: auto decodes through the modules, true says why not
        with pytest.raises(ConfigError, match=r"cannot pack torch\.bfloat16 weights"):
            decode(model, tokenizer, RolloutConfig(compile="false", pack="true"))
        assert_same_draws(
            decode(model, tokenizer, RolloutConfig(compile="false", pack="auto")),
            decode(model, tokenizer, RolloutConfig(compile="false", pack="false")),
        )
        pytest.skip("this CPU's oneDNN packs no bf16 weights (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)")
    modules = decode(model, tokenizer, RolloutConfig(compile="false", pack="false"))
    packed = decode(model, tokenizer, RolloutConfig(compile="false", pack="true"))
    assert torch.equal(packed.completion_ids, modules.completion_ids)
    torch.testing.assert_close(packed.logp, modules.logp, atol=1e-3, rtol=0)


def test_sample_token_draws_from_the_nucleus_and_reports_the_untruncated_logp():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(6000, 1)
    uniform = torch.rand(6000, generator=torch.Generator().manual_seed(0))
    token, logp = sample_token(logits, uniform, temperature=1.0, top_p=0.7)  # nucleus: tokens 0 and 1
    torch.testing.assert_close(
        torch.bincount(token, minlength=4) / 6000.0, torch.tensor([0.625, 0.375, 0, 0]), atol=0.02, rtol=0
    )
    torch.testing.assert_close(logp, probs.log()[token])  # not the renormalised nucleus
    hot, hot_logp = sample_token(logits, uniform, temperature=2.0, top_p=1.0)
    tempered = torch.softmax(probs.log() / 2.0, -1)
    torch.testing.assert_close(torch.bincount(hot, minlength=4) / 6000.0, tempered, atol=0.02, rtol=0)
    torch.testing.assert_close(hot_logp, tempered.log()[hot])


@pytest.mark.parametrize(
    "rollout, message",
    [
        (RolloutConfig(cache="paged"), "choose one of: static, dynamic"),
        (RolloutConfig(compile="maybe"), "choose one of: auto, true, false"),
        (RolloutConfig(max_batch=-1), "algo.rollout.max_batch"),
        (RolloutConfig(compact_below=1.5), "algo.rollout.compact_below"),
        (RolloutConfig(pack="yes"), "choose one of: auto, true, false"),
        (RolloutConfig(stop_check_every=-1), "algo.rollout.stop_check_every"),
        (RolloutConfig(pack="true", compile="true"), "set algo.rollout.compile=false or auto"),
    ],
)
def test_bad_rollout_options_name_the_valid_values(rollout, message):
    with pytest.raises(ConfigError, match=message):
        PolicyGradientConfig(rollout=rollout)
