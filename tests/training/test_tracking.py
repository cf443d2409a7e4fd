"""The wandb run a training run leaves, read back from its offline files (no mocks): the samples table,
reward/KL/entropy against generated tokens, group and job type, and a resumed run continuing the same run id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from run import run_cli
from tests.wandb_records import history, of_type, offline_run

ROOT = Path(__file__).resolve().parents[2]
GRPO = [
    "algo=grpo",
    "model=tiny_llama",
    "algo.max_new_tokens=4",
    "algo.prompts_per_step=1",
    "algo.group_size=2",
    "data.eval_size=1",
    "trainer.eval_batch_size=1",
    "trainer.threads=1",
    "logger.mode=offline",
    "trainer.log_samples=2",
    "experiment_name=tracking_test",
]


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture()
def fresh_wandb():
    import wandb

    wandb.teardown()  # process-wide settings: each run starts from none, as `python run.py` does
    yield
    wandb.teardown()


def test_samples_table_axes_and_resume_into_the_same_wandb_run(tmp_path, fresh_wandb, capsys):
    run_dir = tmp_path / "run"
    assert run_cli(config([*GRPO, "trainer.max_steps=1", "trainer.save_every=1"]), run_dir)[0] == 0
    first_dir, records = offline_run(run_dir)
    run = of_type(records, "run")[0]
    assert (run.run_group, run.job_type) == ("tracking_test", "grpo")  # grouped by experiment, typed by algorithm
    # reward, KL and entropy against generated tokens; tokens and FLOPs are metrics of their own
    metrics = {(m.glob_name or m.name): m.step_metric for m in of_type(records, "metric")}
    for pattern in ("reward/*", "kl", "entropy"):
        assert metrics[pattern] == "tokens/generated_total", pattern
    assert {"tokens/generated_total", "compute/flops_total"} <= set(metrics)
    rows = history(records)
    step_1 = next(r for r in rows if r["_step"] == 1)
    for key in ("reward/total_mean", "kl", "entropy", "tokens/generated_total", "compute/flops_total"):
        assert key in step_1, key
    # the samples table of the last step: one column per reward part, the advantage, the length
    assert step_1["samples/_type"] == "table-file"
    table = json.loads((first_dir / "files" / step_1["samples/path"]).read_text())
    for column in (
        "step",
        "prompt",
        "completion",
        "reward/total",
        "reward/format",
        "reward/similarity",
        "advantage",
        "length",
    ):
        assert column in table["columns"], column
    assert len(table["data"]) == 2 and all(isinstance(row[-1], int) for row in table["data"])

    state = json.loads((run_dir / "checkpoints" / "step_1" / "trainer_state.json").read_text())
    assert state["wandb_run_id"] == run.run_id
    summary = (run_dir / "summary.md").read_text()
    assert f"`wandb sync {first_dir}`" in summary and summary in capsys.readouterr().out

    # resumed: the same wandb run id, continued from step 2
    assert run_cli(config([*GRPO, "trainer.max_steps=2", "trainer.resume=auto"]), run_dir)[0] == 0
    second_dir, resumed = offline_run(run_dir)
    assert second_dir != first_dir and second_dir.name.endswith(run.run_id)
    assert of_type(resumed, "run")[0].run_id == run.run_id
    assert [r["_step"] for r in history(resumed) if "reward/total_mean" in r] == [2]
