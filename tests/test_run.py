"""End-to-end: `python run.py ...` as a user types it, in a subprocess, on the tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model=tiny_llama",
    "trainer.max_steps=2",
    "algo.max_new_tokens=8",
    "algo.prompts_per_step=2",
    "algo.group_size=2",
    "data.eval_size=2",
    "trainer.eval_batch_size=2",
]


def run_py(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_run_dir(run_dir: Path, steps: int) -> list[dict]:
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if "reward/total_mean" in m]
    assert [m["step"] for m in train] == list(range(1, steps + 1))
    for key in (
        "reward/total_mean",
        "advantages/std",
        "kl",
        "entropy",
        "clip_frac",
        "completion/length_mean",
        "time/generate",
        "time/train",
        "tokens/generated",
        "tokens/generated_total",
        "eval/reward/total_mean",
        "tokens/trained",
        "compute/actor_forward_tokens",
        "compute/flops",
        "compute/flops_total",
        "compute/pass_forward_tokens",
        "compute/pass_padding_frac",
        "time/train_total",
        "memory/peak_rss_mb",
    ):
        assert key in train[-1], key
    assert (run_dir / "samples.jsonl").read_text().strip()
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline wandb run"
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "checkpoints" / "final" / "model.safetensors").exists()
    rewards = [k for k in train[-1] if k.startswith("reward/") and k.endswith("_mean")]
    check_summary(run_dir, steps, [k for k in rewards if k != "reward/kl_penalty_mean"])  # a penalty, not a part
    return metrics


def check_summary(run_dir: Path, steps: int, rewards: list[str]) -> str:
    """The end-of-run summary of an RL run: summary.md with every part (a row per logged reward), and the
    curves it points to."""
    summary = (run_dir / "summary.md").read_text()
    assert "reward/total_mean" in rewards and len(rewards) > 1, rewards
    for part in (
        f"- run dir: `{run_dir}`",
        f"- steps: {steps}",
        "s/step)",
        "- peak memory:",
        "- tokens generated:",
        *(f"| {key} |" for key in rewards),
        "| held-out eval | before | after |",
        "## Held-out samples",
        "- before (step 0;",
        f"- after (step {steps};",
        f"Curves: `{run_dir / 'curves.png'}`",
        f"`wandb sync {run_dir / 'wandb'}/offline-run-",
    ):
        assert part in summary, part
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == steps
    return summary


@pytest.mark.slow
def test_grpo_single_run(tmp_path):
    out = tmp_path / "run"
    proc = run_py(["algo=grpo", *TINY, f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_run_dir(out, steps=2)


@pytest.mark.slow
def test_r1_zero_preset_on_the_tiny_model(tmp_path):
    """experiment=r1_zero: the prefilled prompt, the rule-based rewards only, and the held-out reasoning metrics."""
    out = tmp_path / "run"
    tiny = [a for a in TINY if not a.startswith("algo.group_size")] + ["trainer.eval_every=1", "algo.eval_samples=2"]
    proc = run_py(["experiment=r1_zero", *tiny, "trainer.save_final=true", f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = check_run_dir(out, steps=2)
    last = metrics[-1]
    for key in (
        "format_strict_rate",
        "format_strict_pass@2",
        "completion/think_words_median",
        "completion/eos_frac",
        "completion/recheck_frac",
        "reward/language_consistency_mean",
        "reward/format_strict_mean",
    ):
        assert f"eval/{key}" in last, key
    assert "reward/similarity_mean" not in last and "reward/format_soft_mean" not in last  # rule-based only
    evals = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert sorted({e["step"] for e in evals}) == [0, 1, 2] and len(evals) == 3 * 2 * 2  # 2 questions x k = 2
    assert all(e["prompt"].endswith("<think>\n") for e in evals)  # data.prefill
    # data.demonstrations: one worked example as earlier turns, the question after it
    assert all("</think>\nMeningococcal meningitis<|im_end|>\n<|im_start|>user\n" in e["prompt"] for e in evals)


@pytest.mark.slow
def test_grpo_multirun_two_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_py(["-m", "algo=grpo", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())
    assert [p.name for p in run_dirs] == ["0_grpo_seed0", "1_grpo_seed1"]
    for run_dir in run_dirs:
        check_run_dir(run_dir, steps=2)
    sweep_summary = (sweep / "summary.md").read_text()  # one line per job, then the command that compares them
    assert "- 0_grpo_seed0 | grpo | reward/total_mean " in sweep_summary and "- 1_grpo_seed1 | grpo |" in sweep_summary
    assert f"`python experiments/compare.py {sweep}`" in sweep_summary and sweep_summary in proc.stdout
    samples = [(d / "samples.jsonl").read_text() for d in run_dirs]
    assert samples[0] != samples[1], "different seeds sampled identical completions"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("algo.loss_type=foo", "choose one of: grpo, bnpo, dr_grpo, dapo"),
        ("algo.loss_type=gspo", "algo.ratio_level=sequence"),
        ("algo.surrogate=ppo2", "choose one of: clip, cispo, sapo"),
        ("algo.kl_estimator=k9", "choose one of: k1, k2, k3"),
        ("+algo.not_a_key=1", "valid keys"),
        ("trainer.lr_shedule=cosine", "valid keys: name, max_steps, lr"),  # no "+": run.py checks before Hydra
        ("algo=nope", "algo=nope is not a choice of algo; choose one of: eval, grpo, pipeline, ppo"),
        ("experiment=nope", "choose one of: clip_higher, estimators"),
        ("model=nope", "choose one of: r1_distill_llama_8b, smollm2_135m, tiny_llama"),
        ("trainer.lr=fast", "could not be converted"),
    ],
)
def test_bad_config_names_valid_choices(tmp_path, override, expected):
    proc = run_py([override, "model=tiny_llama", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


PPO_TINY = TINY
SHARED_TINY = [a for a in TINY if not a.startswith("algo.group_size")]  # valid for every RL algo


@pytest.mark.slow
def test_ppo_single_run_saves_the_critic(tmp_path):
    out = tmp_path / "run"
    proc = run_py(["algo=ppo", *PPO_TINY, f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = [m for m in check_run_dir(out, steps=2) if "reward/total_mean" in m][-1]
    for key in (
        "value_loss",
        "explained_var",
        "value_clip_frac",
        "kl/sequence",
        "kl_coef",
        "returns/mean",
        "grad_norm/actor",
        "grad_norm/critic",
        "time/critic",
        "time/reference",
        "compute/critic_backward_tokens",
        "compute/reference_forward_tokens",
    ):
        assert key in last, key
    final = out / "checkpoints" / "final"
    assert (final / "critic" / "head.safetensors").exists() and (final / "critic" / "model.safetensors").exists()
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["algo"]["kl_ctl"]["value"] == pytest.approx(0.02)  # conf/algo/ppo.yaml's fixed beta


@pytest.mark.slow
def test_ppo_and_grpo_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_py(["-m", "algo=ppo,grpo", *SHARED_TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())
    assert [p.name for p in run_dirs] == ["0_ppo_seed0", "1_grpo_seed0"]
    for run_dir in run_dirs:
        check_run_dir(run_dir, steps=2)


@pytest.mark.slow
def test_reward_model_then_grpo_on_it(tmp_path):
    rm_run = tmp_path / "rm"
    proc = run_py(
        [
            "algo=reward_model",
            "model=tiny_llama",
            "trainer.max_steps=2",
            "algo.batch_size=2",
            "algo.max_response_tokens=32",
            "data.eval_size=2",
            "trainer.eval_batch_size=2",
            f"hydra.run.dir={rm_run}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(rm_run)
    assert [m["step"] for m in metrics if "rm/loss" in m] == [1, 2]
    assert 0.0 <= metrics[-1]["eval/rm/accuracy"] <= 1.0
    assert (rm_run / "reward_model" / "head.safetensors").exists()

    out = tmp_path / "grpo"
    args = [a for a in TINY if not a.startswith("trainer.max_steps")] + ["trainer.max_steps=1"]
    proc = run_py(
        ["algo=grpo", "reward=reward_model", f"reward.path={rm_run / 'reward_model'}", *args, f"hydra.run.dir={out}"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = [m for m in check_run_dir(out, steps=1) if "reward/total_mean" in m][-1]
    assert last["reward/reward_model_mean"] == pytest.approx(last["reward/total_mean"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["algo=ppo", "algo.kl_control=pid"], "choose one of: fixed, adaptive"),
        (["algo=reward_model", "algo.rejected=random"], "choose one of: other_response, truncated, policy_sample"),
        (["reward=reward_model"], "reward.path"),
    ],
)
def test_bad_ppo_and_reward_model_config(tmp_path, overrides, expected):
    proc = run_py([*overrides, "model=tiny_llama", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, timeout=300)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        ["algo.surrogate=cispo", "algo.loss_type=dapo", "algo.rollout_correction=tis"],
        ["algo.surrogate=sapo", "algo.ratio_level=sequence", "algo.rollout_correction=seq_mis"],
    ],
    ids=["cispo-tis", "sapo-sequence-seq_mis"],
)
def test_surrogates_and_rollout_corrections_run_through_run_py(tmp_path, options):
    out = tmp_path / "run"
    proc = run_py(["algo=grpo", *TINY, *options, f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [m for m in check_run_dir(out, steps=2) if "reward/total_mean" in m]
    for m in steps:  # the correction forces the recompute, so the mismatch is measured every step
        for key in ("rollout_corr/ratio_mean", "rollout_corr/kl", "rollout_corr/masked_frac", "loss", "kl"):
            assert math.isfinite(m[key]), (key, m)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_padding_free_passes_through_run_py(tmp_path, algo):
    """algo.micro_batch_tokens: micro-batches balanced by tokens, every pass packed; nothing but real tokens is
    forwarded (one row per pass at this budget), and at one epoch the ratio to the sampler's log-probs is 1."""
    out = tmp_path / "run"
    extra = ["algo.group_size=1", "algo.prompts_per_step=4"] if algo == "ppo" else []
    proc = run_py([f"algo={algo}", *TINY, *extra, "algo.micro_batch_tokens=512", f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in [m for m in check_run_dir(out, steps=2) if "reward/total_mean" in m]:
        assert step["compute/pass_padding_frac"] == 0.0
        assert step["clip_frac"] == 0.0
        assert step["oom/micro_batch_tokens"] == 512
