"""The GPU check's --tiny mode: the same script on the CPU (Triton under its interpreter, gloo, tiny shapes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import gpu_check

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}


def check_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "experiments" / "gpu_check.py"), "--tiny", "--out", str(out), *args]


@pytest.mark.slow  # ten run.py processes (each imports torch and transformers: ~7 s on 2 CPU cores)
def test_tiny_gpu_check_passes_and_writes_the_report(tmp_path):
    proc = subprocess.run(
        check_cmd(tmp_path, "--budget-s", "3600"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {k: s.get("error") for k, s in report["sections"].items() if s["status"] != "pass"}
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    assert list(report["sections"]) == list(gpu_check.SECTIONS) and report["finished"]
    assert "section timings: environment" in proc.stdout
    assert report["env"]["torch"] and report["env"]["triton"]
    sections = report["sections"]
    assert all(s["seconds"] > 0 and s["estimate_s"] > 0 for s in sections.values())
    assert sections["probe"]["result"]["real_logits_finite"] and sections["probe"]["result"]["logprobs_finite"]
    assert {(r["backend"], r["dtype"]) for r in sections["kernels"]["result"]["rows"]} == {
        (b, d) for b in ("torch", "triton") for d in ("fp32", "bf16")
    }
    for algo in ("grpo", "ppo"):
        assert sections["embedded"]["result"][algo]["resume"]["bit_exact"]  # a CPU repeats itself exactly
        big = sections["8b"]["result"][algo]
        assert big["timed_step"] == 2 and big["tokens_generated"] > 0  # a warm-up step, then the timed one
        assert big["phases_s"]["generate"]["later_mean"] == big["warm_generate_s"]
    assert sections["fsdp"]["result"]["resume"]["bit_exact"]
    assert sections["packing"]["result"]["targets"]["tokens"]["pass"]  # padding-free: real tokens only
    assert "| ours static |" in sections["rollout"]["result"]["markdown"]
    text = (tmp_path / "gpu_check.md").read_text()
    assert all(f"## {name}: pass" in text for name in gpu_check.SECTIONS)


def test_a_budget_too_small_for_the_later_sections_skips_them_and_keeps_the_earlier(tmp_path):
    """The budget fits the environment and the decode (in its child process), not the run.py sections."""
    costs = gpu_check.TINY_COST_S
    budget = costs["environment"] + costs["rollout"] + 15  # 15 s for the imports before the budget's first check
    assert budget < min(costs["8b"], costs["fsdp"])  # whatever the decode takes, they cannot fit after it
    proc = subprocess.run(
        check_cmd(tmp_path, "--budget-s", str(budget), "--sections", "environment", "rollout", "8b", "fsdp"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["environment", "rollout", "8b", "fsdp"] and report["finished"]
    assert sections["environment"]["status"] == "pass" and sections["environment"]["result"]["torch"]
    rollout = sections["rollout"]
    assert rollout["status"] == "pass" and rollout["seconds"] > 0, rollout.get("error")
    steady = rollout["result"]["samplers"]["ours static"]
    assert steady["steady_tokens_per_s"] > 0 and steady["compile_capture_s"] >= 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## rollout: pass" in text and "| ours static |" in text
    for name in ("8b", "fsdp"):
        assert sections[name]["status"] == "skipped" and "seconds" not in sections[name]
        need = gpu_check.TINY_COST_S[name]
        assert f"skipped: needs ~{need} s, " in sections[name]["error"]
        assert f"## {name}: skipped" in text and f"skipped: needs ~{need} s, " in text
    assert "section timings: environment" in proc.stdout and "rollout: pass" in proc.stderr


def test_a_check_killed_mid_way_leaves_the_finished_sections_in_the_report(tmp_path):
    """Killed while its second section runs, the check has left the first one's results in a report that parses."""
    proc = subprocess.Popen(
        check_cmd(tmp_path, "--sections", "environment", "kernels"),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the kill takes bench_logprobs.py with it
    )
    report_file, report = tmp_path / "gpu_check.json", None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if report_file.exists():
                report = json.loads(report_file.read_text())  # written atomically: never half a file
                if report["sections"].get("kernels", {}).get("status") == "running":
                    break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert report is not None and report["sections"]["kernels"]["status"] == "running", report
    report = json.loads(report_file.read_text())  # the file as the kill left it
    assert not report["finished"]
    assert report["sections"]["environment"]["status"] == "pass"
    assert report["sections"]["environment"]["result"]["torch"] and report["sections"]["environment"]["seconds"] >= 0
    assert report["sections"]["kernels"] == {"status": "running", "estimate_s": gpu_check.TINY_COST_S["kernels"]}
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## environment: pass" in text and "## kernels: running" in text


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(sizes, out):
        raise RuntimeError("the kernel exploded")

    def fine(sizes, out):
        # the report on disk already holds the sections before this one
        report = json.loads((tmp_path / "gpu_check.json").read_text())
        assert report["sections"]["kernels"]["status"] == "error" and report["sections"]["probe"]["status"] == "running"
        return {"real_logits_finite": True}

    monkeypatch.setattr(gpu_check, "SECTIONS", {"kernels": broken, "probe": fine, "fsdp": fine})
    monkeypatch.setattr(gpu_check, "TINY_COST_S", {"kernels": 1, "probe": 1, "fsdp": 10**6})
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny", "--out", str(tmp_path)])
    assert gpu_check.main() == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["kernels"]["status"] == "error"
    assert "the kernel exploded" in report["sections"]["kernels"]["traceback"]
    assert report["sections"]["probe"] == {**report["sections"]["probe"], "status": "pass"}
    assert report["sections"]["fsdp"]["status"] == "skipped" and report["finished"]
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## kernels: error" in text and "RuntimeError: the kernel exploded" in text and "## probe: pass" in text
    assert "| kernels | error |" in text and "skipped: needs ~1000000 s," in text
