"""Exact resume: 2k steps in one go == k steps, then k more from the checkpoint (metrics and weights,
bitwise), for GRPO and PPO on the tiny Llama, through the same functions as `python run.py`.
A SIGINT mid-run ends the step, writes a checkpoint and exits with 130; resuming from it is exact too.
SFT and the reward model run in the same loop: stopped (SIGTERM) or killed after step k, they resume
from the checkpoint to the weights of an uninterrupted run."""

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

from data.loading import PromptSampler
from run import run_cli

ROOT = Path(__file__).resolve().parents[1]
K = 2
TINY = [
    "model=tiny_llama",
    "data.eval_size=2",
    "trainer.eval_batch_size=2",
    "logger.mode=disabled",
    "trainer.log_samples=1",
    "trainer.threads=1",
    "data.source=local",
]
RL = ["algo.max_new_tokens=6", "algo.prompts_per_step=2"]
ALGOS = {
    "grpo": ["algo=grpo", *RL, "algo.group_size=2", "algo.minibatch_size=2", "algo.num_iterations=2"],
    # adaptive KL: its beta is part of the state a resume must restore
    "ppo": [
        "algo=ppo",
        *RL,
        "algo.group_size=2",
        "algo.minibatch_size=2",
        "algo.kl_control=adaptive",
        "algo.target_kl=0.01",
        "algo.kl_horizon=10",
    ],
    # dynamic sampling: the extra prompts a step draws move the sampler, whose position a resume restores; the
    # R1 reward on a random model scores most groups alike, so steps do draw more
    "grpo_dynamic": [
        "algo=grpo",
        *RL,
        "algo.group_size=2",
        "algo.minibatch_size=2",
        "algo.dynamic_sampling=true",
        "algo.dynamic_sampling_max_draws=2",
        "reward=format_accuracy",
    ],
    # micro-batches of 1: gradient accumulation is part of what must replay exactly
    "sft": ["algo=sft", "data=medical_o1", "algo.batch_size=2", "algo.micro_batch_size=1"],
    # other_response: the pair rng (the algorithm's own state) picks each step's rejected responses from the
    # batch's own rows, so a batch of more than 2 for the picks to matter
    "reward_model": ["algo=reward_model", "algo.batch_size=4", "algo.max_response_tokens=32"],
}
ALGOS["ppo_packed"] = [*ALGOS["ppo"], "algo.micro_batch_tokens=48"]  # micro-batches by tokens, passes packed
STEP_KEY = {"grpo": "reward/total_mean", "ppo": "reward/total_mean", "sft": "sft/loss", "reward_model": "rm/loss"}


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def train(run_dir: Path, overrides: list[str]) -> int:
    code, _ = run_cli(compose_config([*TINY, *overrides]), run_dir)
    return code


def train_metrics(run_dir: Path, key: str = "reward/total_mean") -> dict[int, dict]:
    """Per-step training metrics (the records with `key`) without timings, memory and evals (a k-step
    run evaluates at step k)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            assert record["step"] not in out, f"step {record['step']} logged twice"
            out[record["step"]] = {
                k: v for k, v in record.items() if not k.startswith(("time/", "cpu_time/", "memory/", "eval/"))
            }
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    files = sorted(a.rglob("*.safetensors"))
    assert files and [f.relative_to(a) for f in files] == [f.relative_to(b) for f in sorted(b.rglob("*.safetensors"))]
    for file in files:
        other = load_file(b / file.relative_to(a))
        for key, tensor in load_file(file).items():
            assert torch.equal(tensor, other[key]), f"{file.relative_to(a)}:{key} differs"


def assert_same_checkpoint(a: Path, b: Path) -> None:
    assert_same_weights(a, b)
    opt_a, opt_b = (torch.load(d / "optimizer.pt", weights_only=True) for d in (a, b))
    for name in opt_a:
        for pid, state in opt_a[name]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, opt_b[name]["state"][pid][key]), (name, pid, key)
    state_a, state_b = (json.loads((d / "trainer_state.json").read_text()) for d in (a, b))
    assert state_a["algo"] == state_b["algo"] and state_a["sampler"] == state_b["sampler"]


@pytest.mark.parametrize("algo", ["grpo", "ppo", "grpo_dynamic", "ppo_packed"])
def test_resume_is_exact(tmp_path, algo):
    full, split = tmp_path / "full", tmp_path / "split"
    assert train(full, [*ALGOS[algo], f"trainer.max_steps={2 * K}"]) == 0
    assert train(split, [*ALGOS[algo], f"trainer.max_steps={K}", f"trainer.save_every={K}"]) == 0
    assert (split / "checkpoints" / f"step_{K}").is_dir()
    assert train(split, [*ALGOS[algo], f"trainer.max_steps={2 * K}", "trainer.resume=auto"]) == 0

    expected, resumed = train_metrics(full), train_metrics(split)
    assert sorted(resumed) == list(range(1, 2 * K + 1))
    assert resumed == expected
    if algo == "grpo_dynamic":  # steps drew more prompts than the batch holds
        assert sum(m["dynamic_sampling/extra_draws"] for m in expected.values()) > 0
    if algo.startswith("ppo"):  # the adaptive beta moved, and moved identically
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
    assert (
        train(tmp_path / "resumed", [*ALGOS["grpo"], f"trainer.max_steps={total}", f"trainer.resume={checkpoint}"]) == 0
    )
    assert train(tmp_path / "full", [*ALGOS["grpo"], f"trainer.max_steps={total}"]) == 0
    assert train_metrics(tmp_path / "resumed")[total] == train_metrics(tmp_path / "full")[total]
    assert_same_checkpoint(tmp_path / "full" / "checkpoints" / "final", tmp_path / "resumed" / "checkpoints" / "final")


class Killed(Exception):
    """A run that dies mid-step (a crash, a kill): no checkpoint of its own, only the save_every ones."""


def stop_at_draw(draw: int, how: str):
    """PromptSampler.draw that stops the run at the loop's `draw`-th step: "sigterm" signals this process
    (the loop finishes that step, checkpoints it and exits 143), "kill" raises Killed before the step."""
    original, calls = PromptSampler.draw, 0

    def stopping_draw(self, seeded: bool = False):
        nonlocal calls
        calls += 1
        if calls == draw and how == "kill":
            raise Killed
        if calls == draw and how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, seeded)

    return stopping_draw


@pytest.mark.parametrize("algo, how", [("sft", "sigterm"), ("sft", "kill"), ("reward_model", "sigterm")])
def test_supervised_stage_resumes_exactly_after_a_stop(tmp_path, monkeypatch, algo, how):
    """Stopped after step k (SIGTERM during it, or killed during step k + 1 with save_every=k), then
    trainer.resume=auto: the same per-step metrics (running totals included) and the same final weights,
    optimiser states and algorithm state as an uninterrupted run."""
    full, split = tmp_path / "full", tmp_path / "split"
    overrides = [*ALGOS[algo], f"trainer.max_steps={2 * K}", f"trainer.save_every={K}"]
    assert train(full, overrides) == 0
    with monkeypatch.context() as patch:
        patch.setattr(PromptSampler, "draw", stop_at_draw(K if how == "sigterm" else K + 1, how))
        if how == "kill":
            with pytest.raises(Killed):
                train(split, overrides)
        else:
            assert train(split, overrides) == 128 + signal.SIGTERM
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == [f"step_{K}"]
    assert train(split, [*overrides, "trainer.resume=auto"]) == 0

    expected, resumed = train_metrics(full, STEP_KEY[algo]), train_metrics(split, STEP_KEY[algo])
    assert sorted(resumed) == list(range(1, 2 * K + 1))
    assert resumed == expected
    assert expected[2 * K]["tokens/trained_total"] == sum(expected[s]["tokens/trained"] for s in expected)
    assert_same_checkpoint(full / "checkpoints" / "final", split / "checkpoints" / "final")
    if algo == "reward_model":  # checkpointed beside the policy, and written for reward=reward_model at the end
        assert (full / "checkpoints" / "final" / "reward_model" / "head.safetensors").is_file()
        assert_same_weights(full / "reward_model", split / "reward_model")
