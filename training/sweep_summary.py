"""The end of a sweep (`python run.py -m ...`): one line per job and the command that compares them,
printed last and written to <sweep dir>/summary.md.

A Hydra callback (conf/config.yaml `hydra.callbacks.sweep_summary`), so that it runs whichever launcher
ran the jobs (in-process, submitit on this machine or on slurm) and whichever sweeper chose them (the
grid, Optuna): it reads each job's summary.json from its directory, not the jobs' return values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from training.summary import SUMMARY_FILE, read_summary, summary_line

COMPARE_SCRIPT = "experiments/compare.py"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep (those Hydra wrote a .hydra/ into), in job-number order."""
    dirs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / ".hydra").is_dir()]

    def number(path: Path) -> tuple[int, str]:
        head = path.name.split("_", 1)[0]
        return (int(head) if head.isdigit() else 1 << 30, path.name)

    return sorted(dirs, key=number)


def sweep_summary(sweep_dir: Path) -> str:
    """The sweep's summary.md: one line per job (a job that did not finish says so) and the compare command."""
    sweep_dir = Path(sweep_dir)
    lines = [f"# Sweep {sweep_dir}", ""]
    for job in job_dirs(sweep_dir):
        summary = read_summary(job)
        lines.append(
            "- "
            + (
                summary_line(summary)
                if summary is not None
                else f"{job.name} | no summary: the job did not finish (see {job / 'run.log'})"
            )
        )
    lines += ["", f"Compare: `python {COMPARE_SCRIPT} {sweep_dir}`", ""]
    return "\n".join(lines)


class SweepSummary(Callback):
    """Prints and writes the sweep's summary when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():  # no job ran (an empty sweep)
            return
        text = sweep_summary(sweep_dir)
        (sweep_dir / SUMMARY_FILE).write_text(text)
        print("\n" + text, flush=True)
