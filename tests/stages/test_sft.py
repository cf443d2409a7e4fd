"""SFT: rendering, the assistant-only loss mask, truncation, a tiny Llama overfitting a few rows, and the
stage in the training loop (its step's counters, the NaN guard, the data check)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from algorithms.common import micro_logprobs
from conf.registry import get_stage
from conf.schema import DataConfig, TrainerConfig, validate
from data.loading import render_prompt
from run import load_data
from stages.sft import (
    SFTConfig,
    SFTExample,
    build_examples,
    clip_text,
    collate,
    encode_example,
    evaluate_nll,
    render_target,
    sft_loss,
    sft_update,
)
from training.interrupts import TrainingError
from training.loop import StageContext, Trainer
from training.tracking import RunLogger
from training.update import OptimTarget, actor_target

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = "Think inside <think> </think> tags, then answer."


def sample_row(tokenizer) -> dict:
    raw = json.loads((ROOT / "data" / "medical_o1_demo.jsonl").read_text().splitlines()[0])
    return {
        "question": raw["Question"],
        "cot": raw["Complex_CoT"],
        "reference": raw["Response"],
        "prompt": render_prompt(tokenizer, raw["Question"], SYSTEM),
    }


def test_render_target_and_prefilled_think():
    assert render_target("why", "because") == "<think>\nwhy\n</think>\nbecause"
    # a template that already opened the think block: the target continues inside it
    assert render_target("why", "because", prompt="<|Assistant|><think>\n") == "why\n</think>\nbecause"


def test_assistant_mask_excludes_every_prompt_token(tokenizer):
    row = sample_row(tokenizer)
    target = render_target(row["cot"], row["reference"])
    example = encode_example(tokenizer, row["prompt"], target, max_length=4096)
    batch = collate([example], tokenizer.pad_token_id)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)[0]  # [T]
    trained = torch.cat([torch.zeros_like(batch["prompt_mask"]), batch["completion_mask"]], dim=1)[0]  # [T]
    # the token sequence is exactly the chat-formatted conversation, tokenised in one go
    joint = tokenizer(row["prompt"] + target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == joint
    n_prompt = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
    for position, (token, is_trained) in enumerate(zip(ids.tolist(), trained.tolist())):
        # every token of the system turn, the user turn and "<|im_start|>assistant\n" is excluded
        assert is_trained == (position >= n_prompt), (position, tokenizer.decode([token]))
    assert tokenizer.decode(ids[:n_prompt]) == row["prompt"]
    assert tokenizer.decode(ids[trained.bool()]) == target + tokenizer.eos_token
    assert not example.truncated


def test_loss_matches_cross_entropy_with_ignored_prompt(tiny_model, tokenizer):
    """Reference: HF-style labels with the prompt set to -100, F.cross_entropy over the full logits."""
    rows = [sample_row(tokenizer), {**sample_row(tokenizer), "prompt": render_prompt(tokenizer, "Short?", SYSTEM)}]
    examples = build_examples(rows, tokenizer, SFTConfig(max_cot_tokens=20, max_response_tokens=10))
    batch = collate(examples, tokenizer.pad_token_id)
    logp, _ = micro_logprobs(tiny_model, batch, temperature=1.0)
    ours = sft_loss(logp, batch["completion_mask"], float(batch["completion_mask"].sum()))

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    labels = torch.where(
        torch.cat([torch.zeros_like(batch["prompt_mask"]), batch["completion_mask"]], 1).bool(),
        ids,
        torch.full_like(ids, -100),
    )
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = tiny_model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    reference = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_truncation_is_counted_and_cuts_the_target_end(tokenizer):
    row = sample_row(tokenizer)
    target = render_target(row["cot"], row["reference"])
    n_prompt = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
    example = encode_example(tokenizer, row["prompt"], target, max_length=n_prompt + 10)
    assert example.truncated and len(example.target_ids) == 10
    assert tokenizer.eos_token_id not in example.target_ids
    full = tokenizer(target, add_special_tokens=False)["input_ids"]
    assert example.target_ids == full[:10]


def test_clip_text_ends_on_a_sentence(tokenizer):
    text = "First sentence is here. Second sentence follows it. Third one is long and will be cut somewhere."
    clipped = clip_text(tokenizer, text, max_tokens=14)
    assert clipped == "First sentence is here. Second sentence follows it."
    assert clip_text(tokenizer, "short", 14) == "short"
    assert clip_text(tokenizer, text, None) == text


def test_micro_batches_make_the_same_step_as_the_full_batch(tiny_model, tokenizer):
    """Targets of unequal length: accumulating 1-row micro-batches must equal one 3-row batch (plain SGD,
    so that the step is the gradient itself)."""
    rows = [render_prompt(tokenizer, q, SYSTEM) for q in ("A?", "Bb bb?", "C c?")]
    examples = [
        encode_example(tokenizer, p, f"<think>\n{'x ' * (3 + 4 * i)}\n</think>\nok", 512) for i, p in enumerate(rows)
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    updated = []
    for micro_batch_size in (3, 1):
        model = copy.deepcopy(tiny_model)
        params = list(model.parameters())
        sft_update(model, batch, [OptimTarget(torch.optim.SGD(params, lr=1.0), params, 1e9)], micro_batch_size)
        updated.append(model.get_input_embeddings().weight.detach() - tiny_model.get_input_embeddings().weight)
    assert updated[0].abs().max() > 0
    torch.testing.assert_close(updated[0], updated[1], rtol=1e-4, atol=1e-7)


def test_sft_overfits_a_handful_of_rows(tiny_model, tokenizer):
    torch.manual_seed(0)
    questions = ["What lowers fever?", "Which organ makes insulin?", "What does the heart pump?", "Name a bone."]
    answers = ["Paracetamol lowers fever.", "The pancreas.", "Blood.", "The femur."]
    rows = [
        {
            "question": q,
            "cot": f"The question asks: {q.lower()} I recall the fact.",
            "reference": a,
            "prompt": render_prompt(tokenizer, q, SYSTEM),
        }
        for q, a in zip(questions, answers)
    ]
    examples = build_examples(rows, tokenizer, SFTConfig())
    batch = collate(examples, tokenizer.pad_token_id)
    target, _ = actor_target(tiny_model, TrainerConfig(lr=3e-3))
    before = evaluate_nll(tiny_model, examples, tokenizer.pad_token_id, batch_size=4)
    for _ in range(60):
        stats = sft_update(tiny_model, batch, [target], micro_batch=2)
    after = evaluate_nll(tiny_model, examples, tokenizer.pad_token_id, batch_size=4)
    assert before > 10.0  # a random model over a 49k vocabulary: about log(49152) = 10.8
    assert after < before / 20, (before, after)
    assert stats["loss"] < 1.0 and stats["skipped_steps"] == 0


def test_sft_rows_from_the_data_loader(tokenizer):
    """data=medical_o1 rows carry what build_examples reads; no sample row is truncated at 512 tokens."""
    from data.loading import attach_prompts, load_examples

    cfg = DataConfig(
        name="medical_o1",
        kind="sft",
        source="local",
        question_field="Question",
        answer_field="Response",
        eval_size=2,
        max_rows=8,
    )
    train, _, _ = load_examples(cfg, ROOT)
    train, _ = attach_prompts(train, tokenizer, cfg)
    examples = build_examples(train, tokenizer, SFTConfig(max_cot_tokens=64, max_response_tokens=64))
    assert len(examples) == 8 and not any(e.truncated for e in examples)
    assert all(isinstance(e, SFTExample) and e.target_ids[-1] == tokenizer.eos_token_id for e in examples)


def sft_trainer(
    tokenizer, policy, run_dir: Path, overrides: list[str], data: str = "medical_o1"
) -> tuple[Trainer, RunLogger]:
    """What run.py builds for algo=sft on 8 rows of `data`, around `policy`."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = validate(
            compose(
                config_name="config",
                overrides=[
                    "algo=sft",
                    f"data={data}",
                    "model=tiny_llama",
                    "data.source=local",
                    "data.max_rows=8",
                    "data.eval_size=2",
                    "logger.mode=disabled",
                    "algo.batch_size=2",
                    *overrides,
                ],
            )
        )
    train_rows, eval_rows, _ = load_data(cfg, tokenizer)
    logger = RunLogger(cfg.logger, run_dir, {}, run_name="test", group="test")
    generator = torch.Generator().manual_seed(cfg.seed)
    ctx = StageContext(cfg, run_dir, [], ROOT, policy, tokenizer, train_rows, eval_rows, None, logger, generator)
    built = get_stage("sft").build(ctx)
    return Trainer(cfg.trainer, built, logger, run_dir, policy, tokenizer, generator), logger


def logged(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "skipped_steps" in r}  # a skipped step logs no loss


def test_sft_steps_report_what_the_loop_counts(tmp_path, tiny_model, tokenizer):
    trainer, logger = sft_trainer(tokenizer, tiny_model, tmp_path, ["trainer.max_steps=2"])
    last = trainer.fit()
    logger.finish()
    steps = logged(tmp_path)
    assert sorted(steps) == [1, 2]
    for m in steps.values():
        assert m["optimizer_steps"] == 1 and m["skipped_steps"] == 0 and m["tokens/trained"] > 0
    assert steps[2]["tokens/trained_total"] == steps[1]["tokens/trained"] + steps[2]["tokens/trained"]
    assert steps[2]["lr"] == pytest.approx(2e-4)  # algo.lr, not trainer.lr
    assert last["eval/sft/loss"] > 0 and (tmp_path / "checkpoints" / "final" / "model.safetensors").is_file()


def test_non_finite_sft_steps_are_skipped_then_stop_the_run(tmp_path, tiny_model, tokenizer):
    """NaN weights make every loss non-finite: each step is skipped (weights kept), counted, and the
    run stops after trainer.max_consecutive_skips of them."""
    with torch.no_grad():
        tiny_model.get_input_embeddings().weight[:] = float("nan")
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    trainer, logger = sft_trainer(
        tokenizer, tiny_model, tmp_path, ["trainer.max_steps=5", "trainer.max_consecutive_skips=2"]
    )
    with pytest.raises(TrainingError, match="2 consecutive steps"):
        trainer.fit()
    logger.finish()
    steps = logged(tmp_path)
    assert sorted(steps) == [1, 2]
    assert [steps[s]["skipped_steps_total"] for s in (1, 2)] == [1, 2]
    assert all(steps[s]["optimizer_steps"] == 0 for s in (1, 2))
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value.nan_to_num(), before[key].nan_to_num()), key


def test_sft_needs_sft_rows(tmp_path, tiny_model, tokenizer):
    with pytest.raises(ValueError, match="algo=sft needs rows with a chain of thought"):
        sft_trainer(tokenizer, tiny_model, tmp_path, [], data="medical_o1_verifiable")
