"""The comparison report's conclusions: intervals per method, a verdict per pair of methods, and the main
effect of each swept option (a factor table), all over seeds with experiments/stats.py.

Runs are anything with `.train` (per-step metric dicts), `.overrides` (Hydra overrides) and `.label` (the
method); a metric is a function Run -> float | None. Rewards are compared at equal generated tokens: each
run's reward-vs-`tokens/generated_total` curve is read at the largest token count every run reaches
(linear interpolation), and its mean over the common budget (the area under the curve divided by the
budget) summarises the whole curve.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from experiments.stats import LEVEL, Difference, mean_ci, verdict, welch

TOKENS = "tokens/generated_total"
Metric = Callable[[Any], float | None]


def token_curve(run: Any, y: str) -> tuple[list[float], list[float]]:
    """(generated tokens so far, y) at each step that logged both."""
    points = [(r[TOKENS], r[y]) for r in run.train if r.get(TOKENS) is not None and r.get(y) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def common_budget(runs: list[Any], y: str) -> tuple[float, float] | None:
    """(start, end) of the token range every run's curve covers: end is the largest token count all runs
    reach, start the latest first point; None when some run has no curve."""
    curves = [token_curve(r, y) for r in runs]
    if not curves or any(not xs for xs, _ in curves):
        return None
    end = min(xs[-1] for xs, _ in curves)
    return min(max(xs[0] for xs, _ in curves), end), end


def values(runs: list[Any], metric: Metric) -> list[float]:
    """The metric of each run that has a finite value of it."""
    out = [metric(r) for r in runs]
    return [v for v in out if v is not None and math.isfinite(v)]


def interval_table(groups: dict[str, list[Any]], metrics: dict[str, Metric], digits: dict[str, int]) -> str:
    """Markdown: per method, each metric's mean over seeds with its Student t interval; a metric no run
    has is left out."""
    cells = {label: {name: values(runs, fn) for name, fn in metrics.items()} for label, runs in groups.items()}
    names = [n for n in metrics if any(cells[label][n] for label in groups)]
    lines = ["| method | seeds | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for label, runs in groups.items():
        row = [mean_ci(cells[label][n]).format(digits.get(n, 3)) if cells[label][n] else "-" for n in names]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def pair_verdicts(groups: dict[str, list[Any]], metrics: dict[str, Metric]) -> list[str]:
    """One verdict line per pair of methods and metric (Welch's t on the per-seed values)."""
    lines = []
    for (a, runs_a), (b, runs_b) in itertools.combinations(groups.items(), 2):
        for name, fn in metrics.items():
            va, vb = values(runs_a, fn), values(runs_b, fn)
            if va and vb:
                lines.append(f"- {name}: {verdict(a, b, welch(va, vb))}")
    return lines


def factor_levels(runs: list[Any]) -> dict[str, dict[str, list[Any]]]:
    """Each override key that takes two or more values over the runs (seeds and hydra.* aside) -> value ->
    the runs with it: the factors of a grid sweep."""
    levels: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for override in run.overrides:
            if "=" not in override or override.startswith(("seed=", "hydra.", "+hydra.")):
                continue
            key, value = override.split("=", 1)
            levels[key.lstrip("+~")][value].append(run)
    return {key: dict(by_value) for key, by_value in levels.items() if len(by_value) > 1}


def factor_table(runs: list[Any], metrics: dict[str, Metric], digits: dict[str, int]) -> list[str]:
    """Markdown lines: per factor and metric, the mean of each level over every run with it (the other
    factors pooled) with its interval, and the largest difference between two levels with Welch's
    interval: the factor's main effect. Then one line per factor naming the metrics it moves."""
    factors = factor_levels(runs)
    if len(factors) < 2:  # one swept option: its effects are the pair verdicts already
        return []
    lines = ["| factor | metric | levels: mean [95 % CI] | largest effect | detected |", "|---|---|---|---|---|"]
    moves: dict[str, list[str]] = {}
    for key, by_value in factors.items():
        moves[key] = []
        for name, fn in metrics.items():
            level_values = {value: values(level_runs, fn) for value, level_runs in by_value.items()}
            level_values = {value: vs for value, vs in level_values.items() if vs}
            if len(level_values) < 2:
                continue
            d = digits.get(name, 3)
            means = ", ".join(f"{value} {mean_ci(vs).format(d)}" for value, vs in level_values.items())
            (hi, lo), effect = largest_effect(level_values)
            span = "-" if effect.low is None else f"[{effect.low:.{d}f}, {effect.high:.{d}f}]"
            lines.append(
                f"| {key} | {name} | {means} | {hi} - {lo}: {effect.diff:+.{d}f} {span} | "
                f"{'yes' if effect.detected else 'no'} |"
            )
            if effect.detected:
                moves[key].append(
                    f"{name} ({hi} - {lo}: {effect.diff:+.{d}f}, {LEVEL:.0%} CI "
                    f"[{effect.low:.{d}f}, {effect.high:.{d}f}])"
                )
    lines.append("")
    for key, moved in moves.items():
        n = min(len(vs) for vs in factors[key].values())
        lines.append(
            f"- `{key}` moves " + "; ".join(moved)
            if moved
            else f"- `{key}`: no effect detected on any metric with at least {n} runs per level"
        )
    return lines


def largest_effect(level_values: dict[str, list[float]]) -> tuple[tuple[str, str], Difference]:
    """The pair of levels (higher mean first) whose means differ most, with Welch's interval."""
    means = {value: sum(vs) / len(vs) for value, vs in level_values.items()}
    hi = max(means, key=means.__getitem__)
    lo = min((v for v in means if v != hi), key=means.__getitem__)
    return (hi, lo), welch(level_values[hi], level_values[lo])
