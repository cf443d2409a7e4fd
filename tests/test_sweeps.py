"""Sweeps off the machine and tuned sweeps, as a user types them: Optuna (hydra/sweeper=optuna, the
tune_lr_beta preset) choosing two trials that hydra-submitit-launcher runs as two jobs in their own
processes (hydra/launcher=submitit_local, the local twin of hydra/launcher=slurm), on the tiny Llama."""

from __future__ import annotations

import os

import pytest
import yaml
from hydra import compose, initialize_config_dir

from tests.test_run import ROOT, run_py

TINY = [
    "model=tiny_llama",
    "trainer.max_steps=1",
    "algo.max_new_tokens=4",
    "algo.prompts_per_step=1",
    "algo.group_size=2",
    "data.eval_size=1",
    "trainer.eval_batch_size=1",
    "logger.mode=disabled",
    "trainer.save_final=false",
    "trainer.threads=1",
]


@pytest.mark.slow
def test_optuna_trials_run_as_submitit_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_py(
        [
            "-m",
            "experiment=tune_lr_beta",
            "hydra/launcher=submitit_local",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0_grpo_seed0", "1_grpo_seed0"]
    # two submitit jobs, each in its own process (a folder per job id)
    assert len([p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]) == 2
    chosen = []
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        chosen.append(
            {o.split("=")[0]: float(o.split("=")[1]) for o in overrides if o.startswith(("trainer.lr=", "algo.beta="))}
        )
        assert 1e-6 <= chosen[-1]["trainer.lr"] <= 1e-4 and 0 <= chosen[-1]["algo.beta"] <= 0.1
        assert (job / "summary.md").exists()
    assert chosen[0] != chosen[1]  # Optuna proposed two points
    # the objective is the held-out eval reward each job's run.py returned
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    evals = [yaml.safe_load((j / "summary.json").read_text())["eval_after"]["eval/reward/total_mean"] for j in jobs]
    assert results["best_value"] == pytest.approx(max(evals))
    summary = (sweep / "summary.md").read_text()
    assert summary.count("- ") >= 2 and f"`python experiments/compare.py {sweep}`" in summary


def test_slurm_launcher_asks_for_an_8_gpu_node(monkeypatch):
    monkeypatch.setenv("SLURM_PARTITION", "gpu-h100")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (8, 8, 1)
    assert launcher.partition == "gpu-h100" and launcher.timeout_min >= 60 and launcher.cpus_per_task >= 1
    monkeypatch.delenv("SLURM_PARTITION")
    assert os.environ.get("SLURM_PARTITION") is None and launcher.partition is None  # slurm's default partition
