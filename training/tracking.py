"""Run outputs: metrics.jsonl, samples.jsonl and a wandb run (offline by default) in the run dir."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, TextIO

from conf.schema import LoggerConfig


class RunLogger:
    """Writes every metric to metrics.jsonl and to wandb; samples (prompt, completion, reward parts) to
    samples.jsonl."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], run_name: str, group: str):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = _open_append(self.run_dir / "metrics.jsonl")
        self.samples_file = _open_append(self.run_dir / "samples.jsonl")
        self.wandb_run = None
        if cfg.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group or group, name=run_name,
                tags=list(cfg.tags), config=config, dir=str(self.run_dir), mode=cfg.mode,
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}
        self.metrics_file.write(json.dumps({"step": step, **clean}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=step)

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.samples_file.write(json.dumps({"step": step, **record}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` from metrics.jsonl and samples.jsonl: a run resumed from
        the checkpoint of `step` redoes them, and each step should appear once."""
        for name in ("metrics_file", "samples_file"):
            file = getattr(self, name)
            file.close()
            path = Path(file.name)
            kept = [line for line in path.read_text().splitlines() if _record_step(line) <= step]
            path.write_text("".join(line + "\n" for line in kept))
            setattr(self, name, _open_append(path))

    def finish(self) -> None:
        self.metrics_file.close()
        self.samples_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _open_append(path: Path) -> TextIO:
    """A line-buffered append handle for a RunLogger jsonl file: the logger keeps it open for its whole life
    and closes it in finish() (truncate_after() closes and reopens it)."""
    return open(path, "a", buffering=1)


def _record_step(line: str) -> float:
    """The step of one jsonl record; a line cut short by a killed process counts as after every step."""
    try:
        return float(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return math.inf


def sample_records(prompts: list[str], completions: list[str], rewards: dict[str, Any], limit: int) -> list[dict]:
    """The first `limit` samples with every reward part, ready for samples.jsonl."""
    out = []
    for i in range(min(limit, len(completions))):
        out.append({
            "prompt": prompts[i],
            "completion": completions[i],
            "rewards": {name: float(values[i]) for name, values in rewards.items()},
        })
    return out
