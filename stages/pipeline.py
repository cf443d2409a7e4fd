"""Multi-stage runs (algo=pipeline, e.g. experiment=r1_pipeline): each stage is a `run.py` run of its own.

The stages of `algo.order` run one after the other as subprocesses of run.py, each in its own
subdirectory of the pipeline's run dir (`01_sft/`, `02_grpo/`, ...), each starting from the
checkpoint the last model-producing stage wrote. After a stage that trains the policy (and once on
the starting model), an `algo=eval` run in `<stage dir>/eval/` measures it on the held-out prompts and
writes the stage's answers beside the previous model's. A stage with `data_from: <name>` trains on the
rows that rejection-sampling stage wrote. `summary.md` tabulates every stage at the end.

A subprocess per stage costs a second of model loading but keeps every stage exactly what
`python run.py algo=<stage> ...` would do, with its own config, logs and wandb run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from conf.checks import ConfigError, check_choice
from conf.options import option
from conf.registry import get_stage, register_stage, stage_names
from conf.schema import ModelConfig
from training.loop import StageContext
from training.summary import SUMMARY_FILE

# a pipeline's own command-line overrides that are not passed on to its stages
PRIVATE_PREFIXES = ("algo", "+algo", "~algo", "experiment", "+experiment", "hydra", "+hydra")


@dataclass
class StageConfig:
    algo: str = option("sft", "the stage's algorithm (its conf/algo/<name>.yaml); any registered stage but pipeline")
    overrides: list[str] = option(factory=list, help="run.py overrides of this stage (data=..., trainer.max_steps=...)")
    data_from: str | None = option(
        None, "sft: train on the rows an earlier rejection_sampling stage (by its name in stages) wrote"
    )
    evaluate: bool = option(True, "run algo=eval on the stage's checkpoint afterwards (model-producing stages)")


@dataclass
class PipelineConfig:
    name: str = option("pipeline", "the stage's name (algo=<name>)")
    order: list[str] = option(factory=list, help="stage names (keys of stages), run in this order")
    stages: dict[str, StageConfig] = option(
        factory=dict, help="stage name -> its algo, overrides, data_from and evaluate (algo.stages.<name>.*)"
    )
    eval_overrides: list[str] = option(factory=list, help="run.py overrides of every eval run")
    evaluate_start: bool = option(True, "evaluate the starting model before the first stage")

    def __post_init__(self) -> None:
        if not self.order:
            raise ConfigError("algo.order is empty: list the stage names to run")
        for name in self.order:
            if name not in self.stages:
                raise ConfigError(f"algo.order: stage {name!r} has no entry in algo.stages ({', '.join(self.stages)})")
        for name, stage in self.stages.items():
            check_choice(f"algo.stages.{name}.algo", stage.algo, tuple(n for n in stage_names() if n != self.name))
            if stage.data_from is not None:
                source = self.stages.get(stage.data_from)
                if source is None or source.algo != "rejection_sampling":
                    raise ConfigError(
                        f"algo.stages.{name}.data_from={stage.data_from!r} must name a rejection_sampling stage"
                    )
                runs_after = (
                    name in self.order
                    and stage.data_from in self.order
                    and (self.order.index(stage.data_from) < self.order.index(name))
                )
                if name in self.order and not runs_after:
                    raise ConfigError(f"algo.stages.{name}.data_from: stage {stage.data_from!r} must run before it")


class PipelineError(ValueError):
    """A stage failed; the message names it and its run dir."""


def shared_overrides(overrides: list[str]) -> list[str]:
    """The pipeline's command-line overrides that apply to every stage (model=, trainer.threads=, seed=...)."""
    return [o for o in overrides if not o.split("=", 1)[0].split(".", 1)[0].startswith(PRIVATE_PREFIXES)]


def model_overrides(path: Path | None) -> list[str]:
    """Overrides that make a stage start from the checkpoint at `path` (none: the configured model)."""
    return [] if path is None else ["model.source=local", f"model.path={path}"]


def comparable_path(model: ModelConfig) -> str | None:
    """How an eval stage can load the pipeline's starting model for before/after answers, if it can."""
    if model.source == "embedded":
        return "embedded"
    if model.source == "local":
        return model.path
    return None  # a random or hub model has no directory to load it back from


def read_metrics(run_dir: Path) -> dict[str, float]:
    """Every key's last value in a run's metrics.jsonl (empty when there is none)."""
    merged: dict[str, float] = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            merged.update({k: v for k, v in json.loads(line).items() if v is not None})
    return merged


def run_stage(run_py: Path, args: list[str], stage_dir: Path, label: str) -> float:
    """`python run.py args hydra.run.dir=stage_dir`; returns its wall time, raises PipelineError on failure."""
    cmd = [sys.executable, str(run_py), *args, f"hydra.run.dir={stage_dir}"]
    print(f"\n=== {label}: python run.py {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False)  # a failure is raised below as a PipelineError
    if proc.returncode != 0:
        raise PipelineError(f"pipeline stage {label} failed (exit {proc.returncode}); its run dir is {stage_dir}")
    return time.perf_counter() - start


def summary_table(records: list[dict]) -> str:
    """The markdown table of every stage: its budget, time and held-out eval."""
    columns = [
        ("eval reward", "eval/reward/total_mean"),
        ("format rate", "eval/format_rate"),
        ("accuracy", "eval/accuracy"),
        ("similarity", "eval/reward/similarity_mean"),
        ("length", "eval/completion/length_mean"),
    ]
    lines = [
        "| stage | algo | steps | time (s) | " + " | ".join(c for c, _ in columns) + " | stage metric |",
        "|---" * (len(columns) + 5) + "|",
    ]
    for r in records:
        ev = r.get("eval", {})
        cells = [f"{ev[key]:.3f}" if key in ev else "" for _, key in columns]
        lines.append(
            f"| {r['stage']} | {r['algo']} | {r.get('steps', '')} | {r['seconds']:.0f} | "
            + " | ".join(cells)
            + f" | {r.get('metric', '')} |"
        )
    return "\n".join(lines)


def stage_summaries(records: list[dict]) -> str:
    """Each stage's own summary.md (written by run.py at its end), its headings a level down, in stage order."""
    parts = []
    for r in records:
        path = Path(r["dir"]) / SUMMARY_FILE
        if path.exists():
            text = "\n".join("##" + line if line.startswith("#") else line for line in path.read_text().splitlines())
            parts.append(text.replace(f"### {r['algo']} run summary", f"### {r['stage']} ({r['algo']})", 1))
    return "\n## Stages\n\n" + "\n".join(parts) if parts else ""


def stage_metric(algo: str, metrics: dict[str, float]) -> str:
    """The one number that says how a stage went besides the eval: its registered objective."""
    key = get_stage(algo).objective
    return f"{key} {metrics[key]:.3f}" if key in metrics else ""


@register_stage("pipeline", PipelineConfig, kind="driver", objective="eval/reward/total_mean")
def run_pipeline(ctx: StageContext) -> dict[str, float]:
    """Run the stages of cfg.algo (PipelineConfig) in order; writes run_dir/summary.md, returns the last eval."""
    cfg, overrides, run_py = ctx.cfg, ctx.overrides, ctx.root / "run.py"
    model_stages = stage_names(trains_policy=True)  # they write checkpoints/final, the next stage's model
    pipe, run_dir = cfg.algo, Path(ctx.run_dir)
    common = shared_overrides(overrides) + [f"experiment_name={cfg.experiment_name}"]
    eval_args = ["algo=eval", *pipe.eval_overrides, *common]
    model: Path | None = None  # None: the configured model; else the checkpoint the stages continue from
    before = comparable_path(cfg.model)
    outputs: dict[str, Path] = {}  # stage name -> its run dir
    records: list[dict] = []
    if pipe.evaluate_start:
        seconds = run_stage(run_py, eval_args, run_dir / "00_start", "start (eval)")
        records.append(
            {
                "stage": "start",
                "algo": "eval",
                "seconds": seconds,
                "dir": run_dir / "00_start",
                "eval": read_metrics(run_dir / "00_start"),
            }
        )
    for i, name in enumerate(pipe.order, start=1):
        stage = pipe.stages[name]
        stage_dir = run_dir / f"{i:02d}_{name}"
        args = [f"algo={stage.algo}", *stage.overrides, *common, *model_overrides(model)]
        if stage.data_from is not None:
            source_dir = outputs[stage.data_from]
            rows = source_dir / OmegaConf.load(source_dir / ".hydra" / "config.yaml").algo.output
            args += ["data.source=local", f"data.local_path={rows}"]
        seconds = run_stage(run_py, args, stage_dir, f"{i}/{len(pipe.order)} {name}")
        outputs[name] = stage_dir
        metrics = read_metrics(stage_dir)
        record = {
            "stage": name,
            "algo": stage.algo,
            "seconds": seconds,
            "dir": stage_dir,
            "metric": stage_metric(stage.algo, metrics),
            "steps": OmegaConf.load(stage_dir / ".hydra" / "config.yaml").trainer.max_steps
            if stage.algo in model_stages
            else "",
        }
        if stage.algo in model_stages:
            checkpoint = stage_dir / "checkpoints" / "final"
            if stage.evaluate:
                compare = [f"algo.before_path={model or before}"] if (model or before) else []
                record["seconds"] += run_stage(
                    run_py,
                    [*eval_args, *model_overrides(checkpoint), *compare],
                    stage_dir / "eval",
                    f"{i}/{len(pipe.order)} {name} (eval)",
                )
                record["eval"] = read_metrics(stage_dir / "eval")
            model = checkpoint
        records.append(record)
    table = summary_table(records)
    total = sum(r["seconds"] for r in records)
    (run_dir / SUMMARY_FILE).write_text(
        f"# {cfg.experiment_name}\n\n{table}\n\nTotal wall time: {total:.0f} s. "
        f"Final model: `{model}`.\n" + stage_summaries(records)
    )
    print(f"\n{table}\n\ntotal wall time {total:.0f} s; final model {model}; summary in {run_dir / SUMMARY_FILE}")
    last_eval: dict = next((r["eval"] for r in reversed(records) if r.get("eval")), {})
    return {**last_eval, "pipeline/seconds": total}
