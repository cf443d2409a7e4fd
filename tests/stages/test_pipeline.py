"""The SFT, eval and rejection-sampling stages through run.py, and experiment=r1_pipeline end to end."""

from __future__ import annotations

import json

import pytest

from conf.schema import ConfigError
from stages.pipeline import PipelineConfig, StageConfig, shared_overrides, summary_table
from tests.test_run import read_metrics, run_py
from tests.wandb_records import history, offline_run

TINY_COMMON = [
    "model=tiny_llama",
    "trainer.max_steps=1",
    "data.eval_size=2",
    "trainer.eval_batch_size=2",
    "logger.mode=disabled",
]


def test_pipeline_config_checks_stage_names_and_data_sources():
    stages = {
        "sft": StageConfig(algo="sft"),
        "rs": StageConfig(algo="rejection_sampling"),
        "sft2": StageConfig(algo="sft", data_from="rs"),
    }
    PipelineConfig(order=["sft", "rs", "sft2"], stages=stages)  # valid
    with pytest.raises(ConfigError, match=r"no entry in algo.stages"):
        PipelineConfig(order=["sft", "grpo"], stages=stages)
    with pytest.raises(ConfigError, match="must run before it"):
        PipelineConfig(order=["sft2", "rs"], stages=stages)
    with pytest.raises(ConfigError, match="must name a rejection_sampling stage"):
        PipelineConfig(order=["sft"], stages={"sft": StageConfig(algo="sft", data_from="sft")})
    with pytest.raises(ConfigError, match="choose one of"):
        PipelineConfig(order=["x"], stages={"x": StageConfig(algo="dpo")})


def test_shared_overrides_keep_the_pipeline_private_keys_back():
    given = [
        "experiment=r1_pipeline",
        "model=tiny_llama",
        "algo.stages.sft.overrides=[a]",
        "trainer.threads=1",
        "hydra.run.dir=x",
        "+algo.foo=1",
        "seed=3",
    ]
    assert shared_overrides(given) == ["model=tiny_llama", "trainer.threads=1", "seed=3"]


def test_summary_table_rows():
    table = summary_table(
        [
            {"stage": "start", "algo": "eval", "seconds": 3.2, "eval": {"eval/format_rate": 0.0}},
            {
                "stage": "sft",
                "algo": "sft",
                "seconds": 10,
                "steps": 4,
                "metric": "loss 1.0",
                "eval": {"eval/format_rate": 0.875, "eval/reward/total_mean": 1.5},
            },
        ]
    )
    lines = table.splitlines()
    assert len(lines) == 4 and lines[3].startswith("| sft | sft | 4 | 10 | 1.500 | 0.875 |")


@pytest.mark.slow
def test_sft_then_eval_with_before_after_answers(tmp_path):
    sft = tmp_path / "sft"
    proc = run_py(
        [
            "algo=sft",
            "data=medical_o1",
            *TINY_COMMON,
            "trainer.max_steps=2",
            "algo.batch_size=2",
            f"hydra.run.dir={sft}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(sft)
    assert [m["step"] for m in metrics if "sft/loss" in m] == [1, 2]
    assert "eval/sft/loss" in metrics[-1] and metrics[0]["data/train_prompts"] == 156
    assert (sft / "checkpoints" / "final" / "model.safetensors").exists()
    summary = (sft / "summary.md").read_text()
    for part in (
        "# sft run summary",
        "- steps: 2",
        "| sft/loss |",
        "| held-out eval | before | after |",
        "| sft/loss |",
        f"Curves: `{sft / 'curves.png'}`",
    ):
        assert part in summary, part

    ev = tmp_path / "eval"
    checkpoint = sft / "checkpoints" / "final"
    proc = run_py(
        [
            "algo=eval",
            *TINY_COMMON,
            "model.source=local",
            f"model.path={checkpoint}",
            f"algo.before_path={checkpoint}",
            "algo.max_new_tokens=8",
            "algo.num_answers=2",
            "algo.questions=['Is water wet?']",
            "logger.mode=offline",
            f"hydra.run.dir={ev}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((ev / "eval.json").read_text())
    for key in (
        "eval/reward/total_mean",
        "eval/reward/format_mean",
        "eval/reward/accuracy_mean",
        "eval/format_rate",
        "eval/accuracy",
        "eval/completion/length_mean",
    ):
        assert key in result, key
    answers = (ev / "answers.md").read_text()
    assert answers.count("| before | after |") == 3 and "**Ground truth:**" in answers
    assert "# Your questions" in answers and "## Q1. Is water wet?" in answers  # a question of the user's own
    summary = (ev / "summary.md").read_text()
    for part in (
        "# eval run summary",
        "| held-out eval | value |",
        "| reward/total_mean |",
        "| format_rate |",
        "- tokens generated:",
        str(ev / "answers.md"),
        f"`wandb sync {ev / 'wandb'}/offline-run-",
    ):
        assert part in summary, part
    # the answers as a wandb table: the held-out questions, then the user's
    run_dir, records = offline_run(ev)
    row = next(r for r in history(records) if "eval/answers/path" in r)
    table = json.loads((run_dir / "files" / row["eval/answers/path"]).read_text())
    assert table["columns"][:4] == ["question", "ground_truth", "before", "after"]
    assert len(table["data"]) == 3 and table["data"][-1][0] == "Is water wet?"


@pytest.mark.slow
def test_r1_pipeline_end_to_end(tmp_path):
    out = tmp_path / "pipe"

    def stage(name: str, *overrides: str) -> str:  # replaces the preset's overrides of one stage
        return f"algo.stages.{name}.overrides=[" + ",".join(f'"{o}"' for o in overrides) + "]"

    tiny_rl = ("data=medical_o1_verifiable", "algo.max_new_tokens=8", "algo.group_size=2")
    budgets = [
        stage("sft", "data=medical_o1", "algo.batch_size=2"),
        stage("grpo", *tiny_rl),
        stage(
            "rejection_sampling",
            "data=medical_o1_verifiable",
            "algo.num_prompts=4",
            "algo.max_new_tokens=8",
            "algo.source_rows=4",
        ),
        stage("sft_rs", "data=medical_o1", "algo.batch_size=2"),
        stage("grpo_final", *tiny_rl),
        'algo.eval_overrides=["data=medical_o1_verifiable","algo.max_new_tokens=8","algo.num_answers=1"]',
    ]
    proc = run_py(["experiment=r1_pipeline", *TINY_COMMON, *budgets, f"hydra.run.dir={out}"], tmp_path, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    stages = ["01_sft", "02_grpo", "03_rejection_sampling", "04_sft_rs", "05_grpo_final"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name[0].isdigit()) == ["00_start", *stages]
    # every stage started from the checkpoint of the stage before it that trained the policy
    started_from = {s: read_config(out / s)["model"] for s in stages}
    assert started_from["01_sft"]["source"] == "random"
    assert started_from["02_grpo"]["path"] == str(out / "01_sft" / "checkpoints" / "final")
    assert started_from["03_rejection_sampling"]["path"] == str(out / "02_grpo" / "checkpoints" / "final")
    assert started_from["04_sft_rs"]["path"] == str(out / "02_grpo" / "checkpoints" / "final")
    assert started_from["05_grpo_final"]["path"] == str(out / "04_sft_rs" / "checkpoints" / "final")
    # the second SFT trained on the rows rejection sampling wrote
    assert read_config(out / "04_sft_rs")["data"]["local_path"] == str(out / "03_rejection_sampling" / "sft_rows.jsonl")
    for stage in ("01_sft", "02_grpo", "04_sft_rs", "05_grpo_final"):
        assert (out / stage / "eval" / "eval.json").exists() and (out / stage / "eval" / "answers.md").exists()
    summary = (out / "summary.md").read_text()
    for name in ("start", "sft", "grpo", "rejection_sampling", "sft_rs", "grpo_final"):
        assert f"| {name} |" in summary, name
    assert "acceptance" in summary and "Total wall time" in summary
    assert "## Stages" in summary and "### grpo_final (grpo)" in summary and "### sft (sft)" in summary


def read_config(run_dir):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
