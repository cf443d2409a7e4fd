"""The GPU check's --tiny mode: the same script on the CPU (Triton under its interpreter, gloo, tiny shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import gpu_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # eight run.py processes (each imports torch and transformers: ~7 s on 2 CPU cores)
def test_tiny_gpu_check_passes_and_writes_the_report(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {k: s.get("error") for k, s in report["sections"].items() if s["status"] != "pass"}
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    assert report["env"]["torch"] and report["env"]["triton"]
    sections = report["sections"]
    assert sections["probe"]["result"]["real_logits_finite"] and sections["probe"]["result"]["logprobs_finite"]
    assert {(r["backend"], r["dtype"]) for r in sections["kernels"]["result"]["rows"]} == {
        (b, d) for b in ("torch", "triton") for d in ("fp32", "bf16")
    }
    for algo in ("grpo", "ppo"):
        assert sections["embedded"]["result"][algo]["resume"]["bit_exact"]  # a CPU repeats itself exactly
        assert sections["8b"]["result"][algo]["tokens_generated"] > 0
    assert sections["fsdp"]["result"]["resume"]["bit_exact"]
    assert "| ours static |" in sections["rollout"]["result"]["markdown"]
    text = (tmp_path / "gpu_check.md").read_text()
    assert all(f"## {name}: pass" in text for name in gpu_check.SECTIONS)


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(sizes, out):
        raise RuntimeError("the kernel exploded")

    def fine(sizes, out):
        return {"real_logits_finite": True}

    monkeypatch.setattr(gpu_check, "SECTIONS", {"kernels": broken, "probe": fine})
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny", "--out", str(tmp_path)])
    assert gpu_check.main() == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["kernels"]["status"] == "error"
    assert "the kernel exploded" in report["sections"]["kernels"]["traceback"]
    assert report["sections"]["probe"] == {**report["sections"]["probe"], "status": "pass"}
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## kernels: error" in text and "RuntimeError: the kernel exploded" in text and "## probe: pass" in text
