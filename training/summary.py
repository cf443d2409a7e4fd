"""The end-of-run summary every stage prints last and writes to <run dir>/summary.md (and summary.json,
which a sweep's summary reads back): where the run is, what it did, what it cost and where to look next.

Everything comes from the run dir itself (metrics.jsonl, the stage's own files), so the summary says
what was logged, and a sweep can summarise jobs that ran in other processes (submitit).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from training.accounting import peak_rss_mb
from training.plots import (
    CURVES_FILE,
    STAGE_CURVE_SUFFIXES,
    curve_keys,
    plot_curves,
    quarter_means,
    read_metrics_file,
    step_rows,
)
from training.tracking import EVAL_SAMPLES_FILE

SUMMARY_FILE = "summary.md"
SUMMARY_JSON = "summary.json"
# held-out metrics shown before -> after besides every reward component's mean
EVAL_KEYS = (
    "eval/format_rate",
    "eval/format_strict_rate",
    "eval/accuracy",
    "eval/completion/length_mean",
    "eval/completion/think_words_median",
    "eval/completion/eos_frac",
)
# files a stage writes that a reader opens next, named in the summary when they exist
OUTPUT_FILES = ("answers.md", "eval.json", "samples.jsonl", "sft_rows.jsonl", "reward_model", "checkpoints/final")


def held_out_keys(record: dict) -> list[str]:
    """The eval/* keys of one record worth a line: reward components, format rate, accuracy, length, loss."""
    keys = [
        k
        for k, v in record.items()
        if k.startswith("eval/")
        and v is not None
        and (
            (k.startswith("eval/reward/") and k.endswith("_mean"))
            or k in EVAL_KEYS
            or k.startswith(("eval/pass@", "eval/format_strict_pass@"))
            or (k.count("/") >= 2 and k.endswith(STAGE_CURVE_SUFFIXES))
        )
    ]  # a supervised stage's held-out loss, accuracy
    return sorted(keys, key=lambda k: (k != "eval/reward/total_mean", not k.startswith("eval/reward/"), k))


def eval_before_after(rows: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """(held-out metrics before the first step, those of the last eval after it); a stage that does not
    train (eval) has only the first."""
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    before = next((r for r in evals if r.get("step", 0) == 0), {})
    after: dict = next((r for r in reversed(evals) if r.get("step", 0) >= 1), {})
    return ({k: before[k] for k in held_out_keys(before)}, {k: after[k] for k in held_out_keys(after)})


SHOWN_SAMPLES = 3  # held-out questions whose samples the summary shows before and after training
SHOWN_CHARS = 600  # of each completion


def held_out_samples(run_dir: Path, shown: int = SHOWN_SAMPLES) -> dict[str, list[dict]]:
    """The first sample of the first `shown` held-out questions at the first eval and at the last one
    (eval_samples.jsonl): {"before": [...], "after": [...]}, the same questions in the same order; {} when
    the run evaluated no samples, or only once (then "before" alone)."""
    path = Path(run_dir) / EVAL_SAMPLES_FILE
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return {}
    first_step, last_step = records[0]["step"], records[-1]["step"]

    def firsts(step: int) -> dict[Any, dict]:
        out: dict[Any, dict] = {}
        for r in records:
            if r["step"] == step:
                out.setdefault(r.get("id"), r)
        return out

    before = firsts(first_step)
    ids = list(before)[:shown]
    out = {"before": [before[i] for i in ids]}
    if last_step != first_step:
        after = firsts(last_step)
        out["after"] = [after[i] for i in ids if i in after]
    return out


def last_value(rows: list[dict], key: str) -> float | None:
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def tokens_generated(rows: list[dict], steps: list[dict]) -> float | None:
    """Tokens sampled by the run: the running total of a training run, else what its passes logged."""
    total = last_value(steps, "tokens/generated_total")
    if total is not None:
        return total
    counts = [r[k] for r in rows for k in ("tokens/generated", "eval/tokens/generated") if r.get(k) is not None]
    return sum(counts) if counts else None


def summarize_run(
    run_dir: Path, stage: str, wall_s: float, wandb_offline_dir: str | None = None, plot: bool = True
) -> dict[str, Any]:
    """The summary of the finished run in `run_dir` (stage `stage`, `wall_s` seconds from start to end), as
    a json-ready dict; draws <run_dir>/curves.png when the run trained (`plot`)."""
    run_dir = Path(run_dir)
    rows = read_metrics_file(run_dir)
    steps = step_rows(rows)
    curves = {}
    for key in curve_keys(steps):
        values = [r[key] for r in steps if r.get(key) is not None]
        if values:
            quarters = quarter_means(values)
            curves[key] = [quarters[0], quarters[-1]]
    before, after = eval_before_after(rows)
    step_times = [r["time/step"] for r in steps]
    peak_cuda = last_value(steps, "memory/peak_cuda_mb")
    curves_png = plot_curves(steps, run_dir / CURVES_FILE, title=f"{stage}: {run_dir}") if plot else None
    return {
        "run_dir": str(run_dir),
        "stage": stage,
        "steps": len(steps),
        "curves": curves,  # key -> [first-quarter mean, last-quarter mean]
        "eval_before": before,
        "eval_after": after,
        "wall_s": wall_s,
        "s_per_step": sum(step_times) / len(step_times) if step_times else None,
        # the loop's per-step reading; a pass stage (eval) reads the process's peak at its end
        "peak_rss_mb": last_value(steps, "memory/peak_rss_mb") or peak_rss_mb(),
        "peak_cuda_mb": peak_cuda,
        "tokens_generated": tokens_generated(rows, steps),
        "curves_png": str(curves_png) if curves_png else None,
        "held_out_samples": held_out_samples(run_dir),
        "outputs": [str(run_dir / name) for name in OUTPUT_FILES if (run_dir / name).exists()],
        "wandb_sync": f"wandb sync {wandb_offline_dir}" if wandb_offline_dir else None,
    }


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: one screen a researcher reads at the end of a run."""
    s = summary
    lines = [f"# {s['stage']} run summary", "", f"- run dir: `{s['run_dir']}`"]
    if s["steps"]:
        lines.append(f"- steps: {s['steps']}")
    per_step = f" ({_num(s['s_per_step'], 2)} s/step)" if s["s_per_step"] else ""
    lines.append(f"- wall time: {_minutes(s['wall_s'])}{per_step}")
    memory = f"{s['peak_rss_mb'] / 1024:.2f} GiB RSS"
    if s["peak_cuda_mb"] is not None:
        memory += f", {s['peak_cuda_mb'] / 1024:.2f} GiB CUDA (max allocated)"
    lines.append(f"- peak memory: {memory}")
    if s["tokens_generated"] is not None:
        lines.append(f"- tokens generated: {int(s['tokens_generated']):,}")
    if s["curves"]:
        lines += ["", "| training metric | first quarter | last quarter |", "|---|---:|---:|"]
        lines += [f"| {k} | {_num(a)} | {_num(b)} |" for k, (a, b) in s["curves"].items()]
    before, after = s["eval_before"], s["eval_after"]
    if before or after:
        if before and after:
            lines += ["", "| held-out eval | before | after |", "|---|---:|---:|"]
            lines += [
                f"| {k.removeprefix('eval/')} | {_num(before.get(k))} | {_num(after.get(k))} |"
                for k in held_out_keys({**before, **after})
            ]
        else:
            lines += ["", "| held-out eval | value |", "|---|---:|"]
            lines += [f"| {k.removeprefix('eval/')} | {_num(v)} |" for k, v in (before or after).items()]
    lines.append("")
    lines += _samples_markdown(s.get("held_out_samples") or {})
    if s["curves_png"]:
        lines += [f"Curves: `{s['curves_png']}`", ""]
    if s["outputs"]:
        lines += ["Outputs: " + ", ".join(f"`{p}`" for p in s["outputs"]), ""]
    if s["wandb_sync"]:
        lines += [f"wandb (offline): `{s['wandb_sync']}`", ""]
    return "\n".join(lines)


def _samples_markdown(samples: dict[str, list[dict]]) -> list[str]:
    """Held-out samples at the first and the last eval, question by question."""
    if not samples:
        return []
    lines = ["## Held-out samples", ""]
    after = {r.get("id"): r for r in samples.get("after", [])}
    for record in samples["before"]:
        lines += [f"**{record.get('id')}** `{_tail(record['prompt'], 160)}`", ""]
        for label, r in (("before", record), ("after", after.get(record.get("id")))):
            if r is None:
                continue
            rewards = ", ".join(f"{k} {v:.2f}" for k, v in r.get("rewards", {}).items())
            lines += [
                f"- {label} (step {r['step']}; {rewards}):",
                "",
                "  ```",
                *("  " + line for line in _head(r["completion"], SHOWN_CHARS).splitlines()),
                "  ```",
                "",
            ]
    return lines


def _head(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + " [...]"


def _tail(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else "[...] " + text[-n:]


def write_summary(run_dir: Path, summary: dict[str, Any]) -> str:
    """Write summary.md and summary.json into `run_dir`; returns the markdown."""
    text = summary_markdown(summary)
    (Path(run_dir) / SUMMARY_FILE).write_text(text)
    (Path(run_dir) / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
    return text


def summary_line(summary: dict[str, Any]) -> str:
    """One line of a sweep's summary: the job, its reward (or loss) first -> last quarter, held-out eval, time."""
    s = summary
    parts = [Path(s["run_dir"]).name, s["stage"]]
    if s["curves"]:
        key, (first, last) = next(iter(s["curves"].items()))
        parts.append(f"{key} {_num(first)} -> {_num(last)}")
    after = s["eval_after"] or s["eval_before"]
    if after:
        key = held_out_keys(after)[0]
        parts.append(f"{key} {_num(after[key])}")
    parts.append(f"{_minutes(s['wall_s'])}")
    return " | ".join(parts)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY_JSON
    return json.loads(path.read_text()) if path.exists() else None
