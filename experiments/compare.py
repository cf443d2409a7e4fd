"""Compare runs side by side from their metrics.jsonl files (no wandb needed): a markdown table and plots.

    python experiments/compare.py multirun/ppo_vs_grpo/<date>            # every run under a sweep dir
    python experiments/compare.py outputs/grpo/<run> outputs/ppo/<run>  # or any runs, any number
    python experiments/compare.py RUNS... --out report/ --title "PPO vs GRPO"

Runs are grouped into methods by their Hydra overrides (`.hydra/overrides.yaml`) minus the seed and
the overrides every run shares; the first table gives each method's mean +- std over its seeds. Runs of
different lengths and runs that lack a metric (GRPO logs no critic, beta=0 no KL) are fine: a missing
value is shown as "-", and a plot skips the runs without its metric. Then the conclusions
(experiments/verdicts.py): 95 % Student t intervals over seeds per method, rewards at equal generated
tokens, a Welch's t verdict per pair of methods, and for a grid sweep the main effect of each swept option.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from experiments.stats import LEVEL, mean_over, value_at
from experiments.verdicts import (
    Metric,
    common_budget,
    eval_curve,
    factor_table,
    interval_table,
    pair_verdicts,
    reach_section,
    token_curve,
)
from training.plots import read_metrics_file

REWARD = "reward/total_mean"
# the held-out metric and threshold whose time to reach the report measures, when runs logged it
REACH = ("eval/format_strict_rate", 0.5)


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


def load_run(run_dir: Path) -> Run:
    rows = read_metrics_file(run_dir)  # a line cut short by a killed run is skipped
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


# overrides that change what a run writes, not what it learns: never part of a method
OUTPUT_ONLY = ("trainer.save_final", "trainer.save_every", "trainer.keep_last", "logger.")


def label_runs(runs: list[Run], ignore: tuple[str, ...] = OUTPUT_ONLY) -> None:
    """A run's method is what sets it apart: its overrides minus seeds, output dirs, shared ones and the keys
    in `ignore` (a key, or a prefix ending in a dot)."""

    def ignored(override: str) -> bool:
        key = override.lstrip("+~").split("=", 1)[0]
        return any(key == k or (k.endswith(".") and key.startswith(k)) for k in ignore)

    def own(run: Run) -> list[str]:
        return [o for o in run.overrides if not o.startswith(("seed=", "hydra.", "+hydra.")) and not ignored(o)]

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
    tail = values[-max(len(values) // 4, 1) :]
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
    Column("pass@1", lambda r: last_of(r.evals, "eval/pass@1")),
    Column("pass@k", lambda r: last_at_k(r, "eval/pass@")),
    Column("maj@k", lambda r: last_at_k(r, "eval/maj@")),
    Column("strict format", lambda r: last_of(r.evals, "eval/format_strict_rate")),
    Column("think words", lambda r: last_of(r.evals, "eval/completion/think_words_median"), 1),
    Column("re-check share", lambda r: last_quarter_mean(r, "completion/recheck_frac")),
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


def last_at_k(run: Run, prefix: str) -> float | None:
    """The last eval's `<prefix>k` for the run's k > 1 (algo.eval_samples), e.g. eval/pass@4."""
    keys = [k for k in (run.evals[-1] if run.evals else {}) if k.startswith(prefix) and k != f"{prefix}1"]
    return last_of(run.evals, keys[0]) if keys else None


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
    lines = ["| method | seeds | " + " | ".join(c.title for c in cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for label, row in rows.items():
        cells = [format_cell(row[c.title], c) for c in cols]
        lines.append(f"| {label} | {len(groups[label])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conclusion_metrics(
    runs: list[Run], reach: tuple[str, float] | None = REACH
) -> tuple[dict[str, Metric], dict[str, Metric], dict[str, Metric]]:
    """(per-method intervals, pair verdicts, factor effects): the metrics each section reports. Rewards at
    equal generated tokens are read at the largest token count all runs reach; with `reach` (a held-out
    metric the runs logged) its last value and its mean over the generated tokens every run reached (AUC)."""
    by_title = {c.title: c.fn for c in COLUMNS}
    rewards: dict[str, Metric] = {}
    budget = common_budget(runs, REWARD)
    if budget is not None:
        start, end = budget
        rewards[f"reward at {end:.0f} tokens"] = lambda r: value_at(*token_curve(r, REWARD), end)
        rewards[f"mean reward over {start:.0f}-{end:.0f} tokens (AUC)"] = lambda r: mean_over(
            *token_curve(r, REWARD), start, end
        )
    held_out: dict[str, Metric] = {}
    key = reach[0] if reach else None
    if key is not None and any(eval_curve(r, key)[0] for r in runs):
        name = key.removeprefix("eval/")
        held_out[f"final {name}"] = lambda r: (eval_curve(r, key)[1] or [None])[-1]
        ends = [eval_curve(r, key)[0][-1] for r in runs if eval_curve(r, key)[0]]
        end = min(ends)
        held_out[f"{name} AUC over 0-{end:.0f} tokens"] = lambda r: (
            mean_over(*eval_curve(r, key), 0.0, end) if eval_curve(r, key)[0] else None
        )
    quality = {
        **rewards,
        **held_out,
        **{t: by_title[t] for t in ("eval reward", "pass@1", "pass@k", "maj@k")},
    }
    cost = {t: by_title[t] for t in ("s/step", "TFLOPs", "peak RSS (MB)", "peak CUDA (MB)")}
    intervals = {"final reward": by_title["final reward"], **quality, **cost}
    factors = {"final reward": by_title["final reward"], **quality, "KL": by_title["KL"], **cost}
    return intervals, quality, factors


def conclusions(runs: list[Run], reach: tuple[str, float] | None = REACH) -> list[str]:
    """The report's markdown after the table: intervals, pair verdicts, the time to reach a held-out
    threshold (`reach`, when the runs logged it), factor effects."""
    intervals, pairs, factors = conclusion_metrics(runs, reach)
    digits = {c.title: c.digits for c in COLUMNS}
    groups = group_runs(runs)
    lines = [
        f"## {LEVEL:.0%} confidence intervals over seeds",
        "",
        interval_table(groups, intervals, digits),
        "",
        "mean [low, high]: Student t interval over the seeds of each method (a single seed has none).",
        "",
    ]
    verdicts = pair_verdicts(groups, pairs)
    if verdicts:
        lines += [
            "## Pairs of methods",
            "",
            "Welch's t on the per-seed values; rewards at equal generated tokens "
            "(each run's reward-vs-tokens curve linearly interpolated).",
            "",
            *verdicts,
            "",
        ]
    reached = reach_section(groups, *reach) if reach else []
    if reached:
        lines += [f"## Time to reach {reach[0]} >= {reach[1]:g}", "", *reached, ""]
    table = factor_table(runs, factors, digits)
    if table:
        lines += ["## Factors (main effects, the other factors pooled)", "", *table, ""]
    return lines


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
    held_out: bool = False  # the y of the held-out evals (eval/*) rather than of the training steps


PLOTS = [
    Plot("reward_vs_step", REWARD, title="mean reward"),
    Plot(
        "reward_vs_tokens",
        REWARD,
        x="tokens/generated_total",
        title="mean reward vs generated tokens",
        xlabel="generated tokens",
    ),
    Plot("reward_vs_time", REWARD, x="time/total", title="mean reward vs wall time", xlabel="seconds"),
    Plot("kl", "kl", title="KL to the reference (k1 per token)"),
    Plot("entropy", "entropy", title="policy entropy per token (nats)"),
    Plot("length", "completion/length_mean", title="completion length (tokens)"),
    # R1's "aha" signs, reported, not tuned for: does the reasoning grow, does it start to re-check itself?
    Plot("think_words", "completion/think_words_median", title="median words in the think block"),
    Plot("recheck", "completion/recheck_frac", title='share of completions that re-check ("wait", "let me check")'),
    Plot(
        "format_strict_vs_tokens",
        "eval/format_strict_rate",
        x="tokens/generated_total",
        title="held-out strict format rate vs generated tokens",
        xlabel="generated tokens",
        held_out=True,
    ),
    Plot(
        "format_strict_vs_step",
        "eval/format_strict_rate",
        title="held-out strict format rate",
        held_out=True,
    ),
]


def curve(run: Run, x: str, y: str, held_out: bool = False) -> tuple[list[float], list[float]]:
    if held_out:
        return eval_curve(run, y, x)
    points = [(r[x], r[y]) for r in run.train if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot(runs: list[Run], spec: Plot, out: Path, window: int) -> Path | None:
    """One PNG: each seed thin, each method's mean over seeds (where all its seeds have the step) thick."""
    groups = group_runs(runs)
    if not any(curve(r, spec.x, spec.y, spec.held_out)[0] for r in runs):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, members) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        curves = [curve(r, spec.x, spec.y, spec.held_out) for r in members]
        curves = [(xs, ys if spec.held_out else smooth(ys, window)) for xs, ys in curves if xs]
        for xs, ys in curves:
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
        if curves:
            n = min(len(xs) for xs, _ in curves)  # mean over the common prefix of the seeds' curves
            mean_x = [sum(xs[j] for xs, _ in curves) / len(curves) for j in range(n)]
            mean_y = [sum(ys[j] for _, ys in curves) / len(curves) for j in range(n)]
            ax.plot(mean_x, mean_y, color=color, linewidth=2, label=f"{label} (n={len(curves)})")
    smoothed = window > 1 and not spec.held_out  # evals are few, and each already a mean over prompts
    ax.set(title=spec.title + (f", moving average of {window}" if smoothed else ""), xlabel=spec.xlabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{spec.name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(
    runs: list[Run], out: Path, title: str, window: int | None = None, reach: tuple[str, float] | None = REACH
) -> Path:
    """report.md with the table and the plots, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    longest = max((len(r.train) for r in runs), default=0)
    window = window if window is not None else max(1, longest // 10)
    lines = [
        f"# {title}",
        "",
        markdown_table(runs),
        "",
        "final reward: mean of the last quarter of the training steps' mean rewards; eval reward: the "
        "last held-out eval (pass@k, maj@k: k = algo.eval_samples); KL, entropy: last-quarter means; "
        "mean ± sample std over seeds.",
        "",
        *conclusions(runs, reach),
    ]
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
    parser.add_argument(
        "--ignore",
        nargs="*",
        default=[],
        metavar="KEY",
        help="more override keys that do not set a method apart (always ignored: " + ", ".join(OUTPUT_ONLY) + ")",
    )
    parser.add_argument(
        "--reach",
        default=f"{REACH[0]}={REACH[1]:g}",
        metavar="KEY=VALUE",
        help="the held-out metric and threshold whose generated tokens to reach are compared (log-rank, "
        "censored), when the runs logged it; 'none' to leave it out (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    reach = None
    if args.reach != "none":
        key, _, value = args.reach.partition("=")
        try:
            reach = (key, float(value))
        except ValueError:
            parser.error(f"--reach {args.reach!r}: expected KEY=VALUE, e.g. {REACH[0]}={REACH[1]:g}")
    runs = [r for r in find_runs(args.paths) if r.train]
    if not runs:
        parser.error(f"no run with training metrics (metrics.jsonl) under {', '.join(map(str, args.paths))}")
    label_runs(runs, OUTPUT_ONLY + tuple(args.ignore))
    report = write_report(runs, args.out or args.paths[0] / "report", args.title, args.smooth, reach)
    print(markdown_table(runs))
    print("\n".join(["", *conclusions(runs, reach)]))
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
