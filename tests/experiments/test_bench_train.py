"""experiments/bench_train.py: the synthetic workload's layout, and a --quick run's figures (padded vs packed)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from experiments.bench_train import synthetic_workload

ROOT = Path(__file__).resolve().parents[2]


def test_the_workload_is_group_contiguous_long_tailed_and_truncated_at_the_cap():
    work = synthetic_workload(4, 4, 256, 80, 250, 1000, truncated_frac=0.2, sigma=1.0, seed=0)
    r = work.rollout
    assert r.prompt_ids.shape[0] == r.completion_ids.shape[0] == 16
    assert all(80 <= p <= 250 for p in work.prompt_lens)
    for g in range(4):  # the G sequences of a group share their prompt, ids and mask
        rows = slice(4 * g, 4 * g + 4)
        assert (r.prompt_ids[rows] == r.prompt_ids[4 * g]).all() and (r.prompt_mask[rows] == r.prompt_mask[4 * g]).all()
    assert (r.prompt_mask.sum(1) == torch.tensor(work.prompt_lens).repeat_interleave(4)).all()
    assert (r.prompt_mask[:, -1] == 1).all() and (r.completion_mask[:, 0] == 1).all()  # left / right padded
    assert r.completion_mask.sum(1).tolist() == work.completion_lens
    # stratified quantiles: the truncated share is the asked one to within one sequence
    assert abs(float(r.truncated.float().mean()) - 0.2) <= 1 / 16
    assert (torch.tensor(work.completion_lens)[r.truncated] == 256).all() and max(work.completion_lens) == 256
    assert statistics.median(work.completion_lens) < 0.6 * 256  # long-tailed: most stop well before the cap
    assert work.real_tokens == int(r.prompt_mask.sum() + r.completion_mask.sum())
    assert work.real_distinct == sum(work.prompt_lens) + sum(work.completion_lens)
    again = synthetic_workload(4, 4, 256, 80, 250, 1000, truncated_frac=0.2, sigma=1.0, seed=0)
    assert torch.equal(again.rollout.completion_ids, r.completion_ids)  # seeded


def test_quick_run_reports_sane_figures(tmp_path):
    out = tmp_path / "bench.json"
    # a process of its own: the CPU memory run sets glibc's mmap threshold for the rest of the process
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench_train.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    padded, packed = figures["modes"]
    assert packed["forwarded_per_real_prompts_once"] <= 1.05
    assert padded["forwarded_per_real_prompts_once"] > packed["forwarded_per_real_prompts_once"]
    assert packed["ref_logp_max_abs_diff"] < 1e-4
    assert packed["grad_max_abs_diff_rel"] < 1e-4 and packed["grad_norm_diff_rel"] < 1e-4
    assert abs(packed["grad_norm"] - padded["grad_norm"]) <= 1e-4 * padded["grad_norm"]
    assert packed["saved_activation_bytes"] < padded["saved_activation_bytes"]
    for mode in (padded, packed):
        assert mode["reference_s"] > 0 and mode["train_s"] > 0 and len(mode["runs"]) == 1
    # the verdicts come from the figures
    time_target = figures["targets"]["time"]
    assert time_target["figure"] == packed["total_cpu_s"] / padded["total_cpu_s"]
    assert time_target["pass"] == (time_target["figure"] <= 0.6) and not time_target["target_setting"]
    assert figures["targets"]["tokens"]["pass"]
    assert "target: forwarded tokens <= 1.05x real" in proc.stdout and "-> PASS" in proc.stdout
    assert "| padded (micro-batch 4) |" in proc.stdout and "| packed (budget 256) |" in proc.stdout
