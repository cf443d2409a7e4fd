"""Exact resume: 2k steps in one go == k steps, then k more from the checkpoint (metrics and weights,
bitwise), for GRPO and PPO on the tiny Llama, through the same functions as `python run.py`.
A SIGINT mid-run ends the step, writes a checkpoint and exits with 130; resuming from it is exact too."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from run import run_cli

ROOT = Path(__file__).resolve().parents[1]
K = 2
TINY = ["model=tiny_llama", "algo.max_new_tokens=6", "algo.prompts_per_step=2", "data.eval_size=2",
        "trainer.eval_batch_size=2", "logger.mode=disabled", "trainer.log_samples=1", "trainer.threads=1",
        "data.source=local"]
ALGOS = {
    "grpo": ["algo=grpo", "algo.group_size=2", "algo.minibatch_size=2", "algo.num_iterations=2"],
    # adaptive KL: its beta is part of the state a resume must restore
    "ppo": ["algo=ppo", "algo.samples_per_prompt=2", "algo.minibatch_size=2", "algo.kl_control=adaptive",
            "algo.target_kl=0.01", "algo.kl_horizon=10"],
}


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def train(run_dir: Path, overrides: list[str]) -> int:
    code, _ = run_cli(compose_config([*TINY, *overrides]), run_dir)
    return code


def train_metrics(run_dir: Path) -> dict[int, dict]:
    """Per-step training metrics without timings, memory and evals (a k-step run evaluates at step k)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "reward/total_mean" in record:
            assert record["step"] not in out, f"step {record['step']} logged twice"
            out[record["step"]] = {k: v for k, v in record.items()
                                   if not k.startswith(("time/", "cpu_time/", "memory/", "eval/"))}
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    for file in sorted(a.rglob("*.safetensors")):
        other = load_file(b / file.relative_to(a))
        for key, tensor in load_file(file).items():
            assert torch.equal(tensor, other[key]), f"{file.relative_to(a)}:{key} differs"
    opt_a, opt_b = (torch.load(d / "optimizer.pt", weights_only=True) for d in (a, b))
    for name in opt_a:
        for pid, state in opt_a[name]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, opt_b[name]["state"][pid][key]), (name, pid, key)
    state_a, state_b = (json.loads((d / "trainer_state.json").read_text()) for d in (a, b))
    assert state_a["algo"] == state_b["algo"] and state_a["sampler"] == state_b["sampler"]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_resume_is_exact(tmp_path, algo):
    full, split = tmp_path / "full", tmp_path / "split"
    assert train(full, [*ALGOS[algo], f"trainer.max_steps={2 * K}"]) == 0
    assert train(split, [*ALGOS[algo], f"trainer.max_steps={K}", f"trainer.save_every={K}"]) == 0
    assert (split / "checkpoints" / f"step_{K}").is_dir()
    assert train(split, [*ALGOS[algo], f"trainer.max_steps={2 * K}", "trainer.resume=auto"]) == 0

    expected, resumed = train_metrics(full), train_metrics(split)
    assert sorted(resumed) == list(range(1, 2 * K + 1))
    assert resumed == expected
    if algo == "ppo":  # the adaptive beta moved, and moved identically
        assert expected[2 * K]["kl_coef"] != expected[1]["kl_coef"]
    assert_same_checkpoint(full / "checkpoints" / "final", split / "checkpoints" / "final")


def test_sigint_saves_a_checkpoint_and_resume_continues(tmp_path, capsys):
    run_dir = tmp_path / "run"
    metrics_file = run_dir / "metrics.jsonl"

    def interrupt_after_first_step() -> None:  # what Ctrl-C does, from outside the training loop
        deadline = time.time() + 120
        while time.time() < deadline:
            if metrics_file.exists() and '"reward/total_mean"' in metrics_file.read_text():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=interrupt_after_first_step, daemon=True)
    watcher.start()
    code = train(run_dir, [*ALGOS["grpo"], "trainer.max_steps=50"])
    watcher.join()
    assert code == 128 + signal.SIGINT
    stopped_at = max(train_metrics(run_dir))
    assert stopped_at < 50
    checkpoint = run_dir / "checkpoints" / f"step_{stopped_at}"
    err = capsys.readouterr().err
    assert f"stopped by SIGINT after step {stopped_at}" in err and f"trainer.resume={checkpoint}" in err
    assert "Traceback" not in err, err
    assert not (run_dir / "checkpoints" / "final").exists()

    # resume from the path it printed, into a new run dir; the result equals an uninterrupted run
    total = stopped_at + 1
    assert train(tmp_path / "resumed", [*ALGOS["grpo"], f"trainer.max_steps={total}",
                                        f"trainer.resume={checkpoint}"]) == 0
    assert train(tmp_path / "full", [*ALGOS["grpo"], f"trainer.max_steps={total}"]) == 0
    assert train_metrics(tmp_path / "resumed")[total] == train_metrics(tmp_path / "full")[total]
    assert_same_checkpoint(tmp_path / "full" / "checkpoints" / "final", tmp_path / "resumed" / "checkpoints" / "final")
