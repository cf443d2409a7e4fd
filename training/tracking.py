"""Run outputs: metrics.jsonl, samples.jsonl and a wandb run (offline by default) in the run dir.

The wandb run carries what a dashboard needs beyond the metrics: reward, KL and entropy plotted against
generated tokens by default (`define_metric`; compute/flops_total is logged in the same rows, so any panel
can switch its x-axis to it), tables of samples (prompt, completion, every reward part, advantage, length)
every trainer.log_samples_every steps, the eval stage's answers as a table, the group (the experiment) and
the job type (the algorithm). Its id is saved in every checkpoint, so that a resumed run continues the same
wandb run instead of starting a second one.

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
from typing import Any, Literal, TextIO, cast

from conf.schema import LoggerConfig

log = logging.getLogger(__name__)
EVAL_SAMPLES_FILE = "eval_samples.jsonl"


class RunLogger:
    """Writes every metric to metrics.jsonl and to wandb; samples (prompt, completion, reward parts) to
    samples.jsonl."""

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        config: dict[str, Any],
        run_name: str,
        group: str,
        job_type: str | None = None,
        resume_id: str | None = None,
    ):
        """`group`: the experiment (wandb's group) unless logger.group names one; `job_type`: the algorithm;
        `resume_id`: the wandb run id a resumed checkpoint saved, continued with resume="allow"."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = _open_append(self.run_dir / "metrics.jsonl")
        self.samples_file = _open_append(self.run_dir / "samples.jsonl")
        self.eval_samples_file = _open_append(self.run_dir / EVAL_SAMPLES_FILE)  # held-out samples of every eval
        self.wandb_run = None
        self.run_id: str | None = None  # the wandb run's id (saved in checkpoints); None without wandb
        self.offline_dir: str | None = None  # an offline run's directory, for `wandb sync`
        self.sync_later: str | None = None  # the offline run dir of an online run that fell back to offline
        if cfg.mode != "disabled":
            self.wandb_run = self.start_wandb(cfg, config, run_name, group, job_type, resume_id)
            self.run_id = self.wandb_run.id
            define_plot_axes(self.wandb_run)

    def start_wandb(
        self,
        cfg: LoggerConfig,
        config: dict[str, Any],
        run_name: str,
        group: str,
        job_type: str | None = None,
        resume_id: str | None = None,
    ):
        """wandb.init in cfg.mode; an online run that cannot start falls back to an offline one."""
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")

        def init(mode: str):
            return wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=cfg.group or group,
                job_type=job_type,
                name=run_name,
                tags=list(cfg.tags),
                config=config,
                dir=str(self.run_dir),
                mode=cast(Literal["online", "offline", "disabled"], mode),  # LoggerConfig checks the choice
                id=resume_id,
                resume="allow" if resume_id else None,
                settings=wandb.Settings(console="off", x_disable_stats=True, init_timeout=cfg.init_timeout_s),
            )

        if cfg.mode != "online":
            run = init(cfg.mode)
            self.offline_dir = run.settings.sync_dir if cfg.mode == "offline" else None
            return run
        try:
            return init("online")
        except (wandb.errors.Error, TimeoutError) as err:
            reason = wandb_failure(err, cfg.init_timeout_s)
        run = init("offline")
        self.sync_later = self.offline_dir = run.settings.sync_dir
        log.warning(
            "wandb: no online run (%s); logging offline to %s instead, upload it later with `wandb sync %s`",
            reason,
            self.sync_later,
            self.sync_later,
        )
        return run

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}
        self.metrics_file.write(json.dumps({"step": step, **clean}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=step)

    def log_samples(self, step: int, records: list[dict[str, Any]], held_out: bool = False) -> None:
        """Sample records to samples.jsonl, or with `held_out` (an eval's samples) to eval_samples.jsonl."""
        file = self.eval_samples_file if held_out else self.samples_file
        for record in records:
            file.write(json.dumps({"step": step, **record}) + "\n")

    def log_samples_table(self, step: int, records: list[dict[str, Any]], key: str = "samples") -> None:
        """Sample records (sample_records) as a wandb table under `key` at `step`."""
        if records:
            columns, rows = samples_table(step, records)
            self.log_table(key, columns, rows, step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A wandb.Table under `key` at `step` (nothing without wandb: the jsonl files hold the same records)."""
        if self.wandb_run is not None:
            import wandb

            # wandb annotates `columns` as list[str | int], which (a list being invariant) rejects a list[str]
            table = wandb.Table(columns=columns, data=rows)  # type: ignore[arg-type]
            self.wandb_run.log({key: table}, step=step)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` from metrics.jsonl, samples.jsonl and eval_samples.jsonl: a run
        resumed from the checkpoint of `step` redoes them, and each step should appear once."""
        for name in ("metrics_file", "samples_file", "eval_samples_file"):
            file = getattr(self, name)
            file.close()
            path = Path(file.name)
            kept = [line for line in path.read_text().splitlines() if _record_step(line) <= step]
            path.write_text("".join(line + "\n" for line in kept))
            setattr(self, name, _open_append(path))

    def finish(self) -> None:
        self.metrics_file.close()
        self.samples_file.close()
        self.eval_samples_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.sync_later is not None:
            print(
                f"wandb: this run was logged offline (no online run could start); upload it with "
                f"`wandb sync {self.sync_later}`"
            )
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


def sample_records(
    prompts: list[str],
    completions: list[str],
    rewards: dict[str, Any],
    limit: int,
    advantages: Any = None,
    lengths: Any = None,
) -> list[dict]:
    """The first `limit` samples with every reward part (and, when given, each one's advantage and completion
    length in tokens: [N] sequences), ready for samples.jsonl and the wandb samples table."""
    out = []
    for i in range(min(limit, len(completions))):
        record: dict[str, Any] = {
            "prompt": prompts[i],
            "completion": completions[i],
            "rewards": {name: float(values[i]) for name, values in rewards.items()},
        }
        if advantages is not None:
            record["advantage"] = float(advantages[i])
        if lengths is not None:
            record["length"] = int(lengths[i])
        out.append(record)
    return out


def samples_table(step: int, records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of a samples table: step, prompt, completion, reward/<part> for every part, then
    advantage and length when the records carry them."""
    parts = list(dict.fromkeys(name for r in records for name in r.get("rewards", {})))
    extras = [key for key in ("advantage", "length") if any(key in r for r in records)]
    columns = ["step", "prompt", "completion", *(f"reward/{p}" for p in parts), *extras]
    rows = [
        [
            step,
            r["prompt"],
            r["completion"],
            *(r.get("rewards", {}).get(p) for p in parts),
            *(r.get(key) for key in extras),
        ]
        for r in records
    ]
    return columns, rows


# x-axes of a run's charts: the cost of getting there, so that runs of different algorithms line up
TOKEN_AXIS = "tokens/generated_total"
COMPUTE_AXES = (TOKEN_AXIS, "compute/flops_total")
AGAINST_TOKENS = ("reward/*", "kl", "kl/*", "entropy")  # plotted against generated tokens by default


def define_plot_axes(run) -> None:
    """Reward, KL and entropy against generated tokens in wandb's default panels; tokens and FLOPs declared as
    metrics in their own right (logged in every step's row, so a panel's x-axis can switch to FLOPs)."""
    for axis in COMPUTE_AXES:
        run.define_metric(axis, summary="max")
    for pattern in AGAINST_TOKENS:
        run.define_metric(pattern, step_metric=TOKEN_AXIS)
