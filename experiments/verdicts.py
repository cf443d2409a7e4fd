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

from experiments.stats import LEVEL, Difference, Survival, km_median, logrank_test, mean_ci, verdict, welch

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


# ---- held-out curves and the time a run takes to reach a threshold on one -------------------------------


def eval_curve(run: Any, key: str, x: str = TOKENS) -> tuple[list[float], list[float]]:
    """(x, key) at each held-out eval that logged `key`: x is the generated tokens so far (`TOKENS`, 0 at the
    eval before the first step) or "step". The evals after a step are logged in that step's row."""
    before = [r for r in run.evals if r.get("step") == 0 and r.get(key) is not None]
    points = [(0.0, before[0][key])] if before else []
    points += [(float(r[x]), r[key]) for r in run.train if r.get(key) is not None and r.get(x) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def time_to_reach(run: Any, key: str, threshold: float, x: str = TOKENS) -> tuple[float, bool] | None:
    """(x at the first held-out eval whose `key` is >= threshold, True), or (x at the last eval, False) when
    none is: right-censored, the run needed more than that. None when the run logged no `key`."""
    xs, ys = eval_curve(run, key, x)
    if not xs:
        return None
    for xv, yv in zip(xs, ys):
        if yv >= threshold:
            return xv, True
    return xs[-1], False


def survival(runs: list[Any], key: str, threshold: float, x: str = TOKENS) -> Survival:
    pairs = [p for p in (time_to_reach(r, key, threshold, x) for r in runs) if p is not None]
    return Survival([t for t, _ in pairs], [reached for _, reached in pairs])


def reach_section(groups: dict[str, list[Any]], key: str, threshold: float) -> list[str]:
    """Markdown: per method, how many seeds reached `key` >= threshold, the Kaplan-Meier median generated
    tokens and steps to get there; one log-rank verdict per pair of methods (censored runs count as
    'more than their last eval', not as their last eval); [] when no run logged `key`."""
    data = {label: survival(runs, key, threshold) for label, runs in groups.items()}
    if not any(s.n for s in data.values()):
        return []
    steps = {label: survival(runs, key, threshold, "step") for label, runs in groups.items()}
    lines = [
        f"| method | seeds | reached {key} >= {threshold:g} | median tokens to reach | median steps to reach |",
        "|---|---:|---:|---:|---:|",
    ]

    def median(s: Survival) -> str:
        m = km_median(s)
        if m is not None:
            return f"{m:,.0f}"
        longest = max((t for t, r in zip(s.times, s.reached) if not r), default=None)
        return f"not reached (> {longest:,.0f})" if longest is not None else "-"

    for label, s in data.items():
        lines.append(f"| {label} | {s.n} | {sum(s.reached)} of {s.n} | {median(s)} | {median(steps[label])} |")
    lines += [
        "",
        "Log-rank test on generated tokens to reach the threshold, runs that never reach it right-censored "
        "at their last eval; two-sided p by exact permutation of the method labels.",
        "",
    ]
    for (a, sa), (b, sb) in itertools.combinations(data.items(), 2):
        if not sa.n or not sb.n:
            continue
        test = logrank_test(sa, sb)
        if test is None:
            lines.append(f"- {a} vs {b}: not testable (no run of either reached the threshold)")
            continue
        z, p = test
        seeds = f"{sa.n} vs {sb.n} seeds"
        if p < 1 - LEVEL:
            faster, slower = (a, b) if z > 0 else (b, a)
            lines.append(f"- {faster} reaches it sooner than {slower} (log-rank z {abs(z):.2f}, p = {p:.3f}, {seeds})")
        else:
            lines.append(f"- {a} vs {b}: no difference detected with {seeds} (log-rank z {z:+.2f}, p = {p:.3f})")
    return lines
