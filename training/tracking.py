"""Run outputs: metrics.jsonl, samples.jsonl and a wandb run (offline by default) in the run dir.

An online wandb run that cannot start (server unreachable within logger.init_timeout_s, no API key)
logs offline in the run dir instead: one warning line, and the `wandb sync` command when the run ends.
Nothing is lost and the run goes on; metrics.jsonl is written either way.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, TextIO

from conf.schema import LoggerConfig

log = logging.getLogger(__name__)


class RunLogger:
    """Writes every metric to metrics.jsonl and to wandb; samples (prompt, completion, reward parts) to
    samples.jsonl."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], run_name: str, group: str):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = _open_append(self.run_dir / "metrics.jsonl")
        self.samples_file = _open_append(self.run_dir / "samples.jsonl")
        self.wandb_run = None
        self.sync_later: str | None = None  # the offline run dir of an online run that fell back to offline
        if cfg.mode != "disabled":
            self.wandb_run = self.start_wandb(cfg, config, run_name, group)

    def start_wandb(self, cfg: LoggerConfig, config: dict[str, Any], run_name: str, group: str):
        """wandb.init in cfg.mode; an online run that cannot start falls back to an offline one."""
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")

        def init(mode: str):
            return wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group or group, name=run_name,
                tags=list(cfg.tags), config=config, dir=str(self.run_dir), mode=mode,
                settings=wandb.Settings(console="off", x_disable_stats=True, init_timeout=cfg.init_timeout_s),
            )

        if cfg.mode != "online":
            return init(cfg.mode)
        try:
            return init("online")
        except (wandb.errors.Error, TimeoutError) as err:
            reason = wandb_failure(err, cfg.init_timeout_s)
        run = init("offline")
        self.sync_later = run.settings.sync_dir
        log.warning("wandb: no online run (%s); logging offline to %s instead, upload it later with `wandb sync %s`",
                    reason, self.sync_later, self.sync_later)
        return run

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
        if self.sync_later is not None:
            print(f"wandb: this run was logged offline (no online run could start); upload it with "
                  f"`wandb sync {self.sync_later}`")
            self.sync_later = None


def wandb_failure(err: Exception, timeout_s: float) -> str:
    """Why wandb.init could not start an online run, in a few words for the warning line."""
    text = " ".join(str(err).strip().splitlines()[0].split()) if str(err).strip() else type(err).__name__
    if "no api key" in text.lower():
        return "no wandb API key: run `wandb login` or set WANDB_API_KEY"
    if "timed out" in text.lower() or isinstance(err, TimeoutError):
        return f"the wandb server did not answer within logger.init_timeout_s={timeout_s:g}s: {text[:160]}"
    return f"wandb.init failed: {text[:200]}"


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
