"""Rejection sampling: the best well-formed sample per prompt above a threshold, written as SFT rows."""

from __future__ import annotations

import json

import torch

from conf.schema import Config, DataConfig, LoggerConfig, ModelConfig, RewardConfig, TrainerConfig
from data.loading import attach_prompts, load_examples, render_prompt
from rewards import CombinedReward
from stages.rejection_sampling import RejectionSamplingConfig, rejection_sample, select, split_think
from stages.sft import collate, encode_example, sft_update
from training.loop import StageContext
from training.tracking import RunLogger
from training.update import actor_target

ROW = {"question": "Q?", "answer": "blood", "reference": "", "cot": "", "options": None, "kind": "open", "id": "0"}


def test_split_think():
    assert split_think("p", "<think>\nwhy\n</think>\nbecause") == ("why", "because")
    assert split_think("p", "because") is None
    assert split_think("p", "<think>why</think>") is None  # no answer
    assert split_think("<think>\n", "why\n</think>\nbecause") == ("why", "because")  # prefilled think


def test_select_keeps_the_best_well_formed_sample_above_threshold():
    completions = [
        "<think>a</think>x",
        "<think>b</think>y",
        "no format but best",  # prompt 0
        "<think>c</think>z",
        "nothing",
        "nothing",
    ]  # prompt 1
    totals = torch.tensor([0.5, 0.9, 3.0, 0.1, 0.0, 0.0])
    kept, rejected = select(["p"] * 6, completions, [ROW] * 3 + [{**ROW, "question": "Q2?"}] * 3, totals, 3, 0.2)
    assert [(r["Complex_CoT"], r["Response"], r["reward"]) for r in kept] == [("b", "y", totals[1].item())]
    assert rejected == {"below_threshold": 1, "not_think_format": 0}
    _, rejected = select(["p"] * 2, ["plain", "text"], [ROW] * 2, torch.ones(2), 2, 0.0)
    assert rejected == {"below_threshold": 0, "not_think_format": 1}


def overfit(model, tokenizer, prompts: list[str], target: str, steps: int = 40) -> None:
    """Teach the tiny model one fixed answer, so that its samples are in the R1 format."""
    batch = collate([encode_example(tokenizer, p, target, 512) for p in prompts], tokenizer.pad_token_id)
    optim_target, _ = actor_target(model, TrainerConfig(lr=3e-3))
    for _ in range(steps):
        sft_update(model, batch, [optim_target], micro_batch=len(prompts))


def test_rejection_sampling_writes_valid_sft_rows_that_pass(tiny_model, tokenizer, tmp_path):
    torch.manual_seed(0)
    system = "Think inside <think> </think> tags."
    rows = [
        {**ROW, "id": str(i), "question": q, "prompt": render_prompt(tokenizer, q, system)}
        for i, q in enumerate(["What does the heart pump?", "What flows in veins?", "Red fluid?"])
    ]
    overfit(tiny_model, tokenizer, [r["prompt"] for r in rows], "<think>\nrecall\n</think>\nblood")
    reward_fn = CombinedReward({"format": 1.0, "accuracy": 1.0})
    algo = RejectionSamplingConfig(
        samples_per_prompt=3, batch_size=2, max_new_tokens=12, temperature=0.5, threshold=1.5
    )
    cfg = Config(
        model=ModelConfig(),
        data=DataConfig(),
        reward=RewardConfig(),
        algo=algo,
        trainer=TrainerConfig(),
        logger=LoggerConfig(mode="disabled"),
    )
    logger = RunLogger(cfg.logger, tmp_path, {}, "rs", "test")
    metrics = rejection_sample(
        StageContext(
            cfg,
            tmp_path,
            policy=tiny_model,
            tokenizer=tokenizer,
            train_rows=rows,
            reward_fn=reward_fn,
            logger=logger,
            generator=torch.Generator().manual_seed(0),
        )
    )
    logger.finish()

    written = [json.loads(line) for line in (tmp_path / "sft_rows.jsonl").read_text().splitlines()]
    assert len(written) == metrics["rs/accepted"] > 0
    assert metrics["rs/acceptance_rate"] == len(written) / len(rows)
    assert all(r["reward"] > algo.threshold for r in written)
    # the file is SFT data: data=medical_o1 reads every row, none skipped, and the targets are the samples
    data_cfg = DataConfig(
        name="medical_o1",
        kind="sft",
        source="local",
        local_path=str(tmp_path / "sft_rows.jsonl"),
        question_field="Question",
        answer_field="Response",
        eval_size=0,
    )
    sft_rows, _, skipped = load_examples(data_cfg, tmp_path)
    assert skipped == {} and len(sft_rows) == len(written)
    assert all(r["cot"] == "recall" and r["reference"] == "blood" for r in sft_rows)
    assert attach_prompts(sft_rows, tokenizer, data_cfg)[1] == {}
