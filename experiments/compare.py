"""Compare runs side by side from their metrics.jsonl files (no wandb needed): a markdown table and plots.

    python experiments/compare.py multirun/ppo_vs_grpo/<date>            # every run under a sweep dir
    python experiments/compare.py outputs/grpo/<run> outputs/ppo/<run>  # or any runs, any number
    python experiments/compare.py RUNS... --out report/ --title "PPO vs GRPO"

Runs are grouped into methods by their Hydra overrides (`.hydra/overrides.yaml`) minus the seed and
the overrides every run shares; each method's numbers are the mean +- std over its seeds. Runs of
different lengths and runs that lack a metric (GRPO logs no critic, beta=0 no KL) are fine: a missing
value is shown as "-", and a plot skips the runs without its metric.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REWARD = "reward/total_mean"


@dataclass
class Run:
    path: Path
    overrides: list[str]  # Hydra overrides of this run, seed included
    seed: int | None
    train: list[dict]  # one dict per RL step (rows with the training reward), in step order
    evals: list[dict]  # rows with held-out eval metrics
    label: str = ""  # the method: filled in by `label_runs`


@dataclass
class Column:
    title: str
    fn: object  # Run -> float | None
    digits: int = 3
    spread: bool = True  # show "± std" over seeds


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
    return rows


def load_run(run_dir: Path) -> Run:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = sorted((r for r in rows if r.get(REWARD) is not None), key=lambda r: r.get("step", 0))
    evals = [r for r in rows if r.get(f"eval/{REWARD}") is not None]
    hydra_dir = run_dir / ".hydra"
    overrides = []
    if (hydra_dir / "overrides.yaml").exists():
        overrides = [str(o) for o in yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) or []]
    seed = None
    if (hydra_dir / "config.yaml").exists():
        seed = (yaml.safe_load((hydra_dir / "config.yaml").read_text()) or {}).get("seed")
    return Run(run_dir, overrides, seed, train, evals)


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run dir (one with a metrics.jsonl) at or under the given paths, in path order."""
    run_dirs: list[Path] = []
    for path in paths:
        if (path / "metrics.jsonl").exists():
            run_dirs.append(path)
        else:
            run_dirs += sorted(p.parent for p in path.rglob("metrics.jsonl"))
    return [load_run(d) for d in dict.fromkeys(run_dirs)]


def label_runs(runs: list[Run]) -> None:
    """A run's method is what sets it apart: its overrides minus seeds, output dirs and shared ones."""

    def own(run: Run) -> list[str]:
        return [o for o in run.overrides if not o.startswith(("seed=", "hydra.", "+hydra."))]

    shared = set.intersection(*(set(own(r)) for r in runs)) if runs else set()
    for run in runs:
        distinct = [o for o in own(run) if o not in shared]
        run.label = " ".join(distinct) or (run.path.name if len({tuple(own(r)) for r in runs}) > 1 else "run")
    if len({r.label for r in runs}) == 1 and len({r.seed for r in runs}) < len(runs):
        for run in runs:  # identical settings and seeds: keep the runs apart by their directories
            run.label = run.path.name


def last_quarter_mean(run: Run, key: str) -> float | None:
    values = [r[key] for r in run.train if r.get(key) is not None]
    if not values:
        return None
    tail = values[-max(len(values) // 4, 1):]
    return sum(tail) / len(tail)


def mean_of(run: Run, key: str) -> float | None:
    values = [r[key] for r in run.train if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def last_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return values[-1] if values else None


def max_of(run: Run, key: str) -> float | None:
    values = [r[key] for r in run.train if r.get(key) is not None]
    return max(values) if values else None


COLUMNS = [
    Column("steps", lambda r: float(len(r.train)) if r.train else None, 0, spread=False),
    Column("final reward", lambda r: last_quarter_mean(r, REWARD)),
    Column("mean reward", lambda r: mean_of(r, REWARD)),
    Column("eval reward", lambda r: last_of(r.evals, f"eval/{REWARD}")),
    Column("KL", lambda r: last_quarter_mean(r, "kl"), 4),
    Column("entropy", lambda r: last_quarter_mean(r, "entropy")),
    Column("length", lambda r: mean_of(r, "completion/length_mean"), 1),
    Column("time (s)", lambda r: last_of(r.train, "time/total"), 0),
    Column("s/step", lambda r: mean_of(r, "time/step"), 1),
    Column("peak RSS (MB)", lambda r: max_of(r, "memory/peak_rss_mb"), 0),
    Column("peak CUDA (MB)", lambda r: max_of(r, "memory/peak_cuda_mb"), 0),
    Column("gen. tokens", lambda r: last_of(r.train, "tokens/generated_total"), 0),
    Column("trained tokens", lambda r: last_of(r.train, "tokens/trained_total"), 0),
    Column("TFLOPs", lambda r: _scaled(last_of(r.train, "compute/flops_total"), 1e-12), 2),
]


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with one value)."""
    mean = sum(values) / len(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.label].append(run)
    return dict(groups)


def summary(runs: list[Run]) -> dict[str, dict[str, tuple[float, float | None] | None]]:
    """method -> column -> (mean, std) over the method's runs that have the value (None: no run has it)."""
    table: dict[str, dict[str, tuple[float, float | None] | None]] = {}
    for label, members in group_runs(runs).items():
        row = {}
        for col in COLUMNS:
            values = [v for v in (col.fn(r) for r in members) if v is not None and math.isfinite(v)]
            row[col.title] = mean_std(values) if values else None
        table[label] = row
    return table


def format_cell(cell: tuple[float, float | None] | None, col: Column) -> str:
    if cell is None:
        return "-"
    mean, std = cell
    return f"{mean:.{col.digits}f}" + (f" ± {std:.{col.digits}f}" if std is not None and col.spread else "")


def markdown_table(runs: list[Run]) -> str:
    rows = summary(runs)
    groups = group_runs(runs)
    cols = [c for c in COLUMNS if any(rows[label][c.title] is not None for label in rows)]  # drop empty columns
    lines = ["| method | seeds | " + " | ".join(c.title for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for label, row in rows.items():
        cells = [format_cell(row[c.title], c) for c in cols]
        lines.append(f"| {label} | {len(groups[label])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (per-step rewards of a few samples are noisy)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@dataclass
class Plot:
    name: str  # file stem
    y: str
    x: str = "step"
    title: str = ""
    xlabel: str = "step"
    skipped: list[str] = field(default_factory=list)


PLOTS = [
    Plot("reward_vs_step", REWARD, title="mean reward"),
    Plot("reward_vs_tokens", REWARD, x="tokens/generated_total", title="mean reward vs generated tokens",
         xlabel="generated tokens"),
    Plot("reward_vs_time", REWARD, x="time/total", title="mean reward vs wall time", xlabel="seconds"),
    Plot("kl", "kl", title="KL to the reference (k1 per token)"),
    Plot("entropy", "entropy", title="policy entropy per token (nats)"),
    Plot("length", "completion/length_mean", title="completion length (tokens)"),
]


def curve(run: Run, x: str, y: str) -> tuple[list[float], list[float]]:
    points = [(r[x], r[y]) for r in run.train if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot(runs: list[Run], spec: Plot, out: Path, window: int) -> Path | None:
    """One PNG: each seed thin, each method's mean over seeds (where all its seeds have the step) thick."""
    groups = group_runs(runs)
    if not any(curve(r, spec.x, spec.y)[0] for r in runs):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, members) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        curves = [curve(r, spec.x, spec.y) for r in members]
        curves = [(xs, smooth(ys, window)) for xs, ys in curves if xs]
        for xs, ys in curves:
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
        if curves:
            n = min(len(xs) for xs, _ in curves)  # mean over the common prefix of the seeds' curves
            mean_x = [sum(xs[j] for xs, _ in curves) / len(curves) for j in range(n)]
            mean_y = [sum(ys[j] for _, ys in curves) / len(curves) for j in range(n)]
            ax.plot(mean_x, mean_y, color=color, linewidth=2, label=f"{label} (n={len(curves)})")
    ax.set(title=spec.title + (f", moving average of {window}" if window > 1 else ""), xlabel=spec.xlabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{spec.name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(runs: list[Run], out: Path, title: str, window: int | None = None) -> Path:
    """report.md with the table and the plots, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    longest = max((len(r.train) for r in runs), default=0)
    window = window if window is not None else max(1, longest // 10)
    lines = [f"# {title}", "", markdown_table(runs), "",
             "final reward: mean of the last quarter of the training steps' mean rewards; eval reward: the "
             "last held-out eval; KL, entropy: last-quarter means; mean ± sample std over seeds.", ""]
    for spec in PLOTS:
        path = plot(runs, spec, out, window)
        lines.append(f"![{spec.title}]({path.name})" if path else f"_{spec.title}: no run logged `{spec.y}`._")
    lines.append("")
    lines.append("Runs: " + ", ".join(f"`{r.path}`" for r in runs))
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", type=Path, nargs="+", help="run dirs or dirs holding runs (a multirun dir)")
    parser.add_argument("--out", type=Path, default=None, help="report dir (default: <first path>/report)")
    parser.add_argument("--title", default="Comparison")
    parser.add_argument("--smooth", type=int, default=None, help="moving-average window (default: steps / 10)")
    args = parser.parse_args(argv)
    runs = [r for r in find_runs(args.paths) if r.train]
    if not runs:
        parser.error(f"no run with training metrics (metrics.jsonl) under {', '.join(map(str, args.paths))}")
    label_runs(runs)
    report = write_report(runs, args.out or args.paths[0] / "report", args.title, args.smooth)
    print(markdown_table(runs))
    print(f"\nreport: {report}")
    return report


if __name__ == "__main__":
    main()
