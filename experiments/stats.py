"""The statistics of the comparison report: intervals over seeds, Welch's test of two methods, and a
run's reward at a token budget. Seeds are the unit: each run gives one number per metric.

- `mean_ci`: the mean over seeds with its Student t interval (mean +- t_{1-a/2, n-1} * s / sqrt(n)).
- `welch`: the difference of two methods' means with Welch's interval (unequal variances,
  Welch-Satterthwaite degrees of freedom), the test the verdict lines use.
- `value_at`, `mean_over`: a run's curve (reward against generated tokens) read at a budget by linear
  interpolation, and its mean over a budget (the area under the curve over the budget's width).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from dataclasses import dataclass

from scipy.stats import t as student_t

LEVEL = 0.95  # confidence level of every interval in the report


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None with one seed: no spread to estimate
    high: float | None
    n: int

    def format(self, digits: int = 3) -> str:
        if self.low is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with Welch's interval; low/high None when either side has fewer than 2 values."""

    diff: float
    low: float | None
    high: float | None
    df: float | None
    n_a: int
    n_b: int

    @property
    def detected(self) -> bool:
        """The interval excludes 0."""
        return self.low is not None and (self.low > 0 or self.high < 0)


def t_quantile(p: float, df: float) -> float:
    """The p quantile of Student's t with df degrees of freedom."""
    return float(student_t.ppf(p, df))


def mean_ci(values: list[float], level: float = LEVEL) -> Interval:
    """The mean of `values` (one per seed) with its Student t interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, None, n)
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def welch(a: list[float], b: list[float], level: float = LEVEL) -> Difference:
    """mean(a) - mean(b) with Welch's t interval at `level`."""
    diff = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(diff, None, None, None, len(a), len(b))
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # both sides without spread: the difference is exact
        return Difference(diff, diff, diff, math.inf, len(a), len(b))
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return Difference(diff, diff - half, diff + half, df, len(a), len(b))


def verdict(name_a: str, name_b: str, d: Difference, digits: int = 3) -> str:
    """One line: "A above B (difference, interval)", or that no difference was detected with the seeds at
    hand, or that it cannot be tested (a side with one seed)."""
    seeds = f"{d.n_a} vs {d.n_b} seeds"
    if d.low is None:
        return f"{name_a} vs {name_b}: not testable with {seeds} (Welch's test needs at least 2 per method)"
    if not d.detected:
        return (
            f"{name_a} vs {name_b}: no difference detected with {seeds} "
            f"(difference {d.diff:+.{digits}f}, {LEVEL:.0%} CI [{d.low:.{digits}f}, {d.high:.{digits}f}])"
        )
    if d.diff < 0:  # name the higher one first
        name_a, name_b = name_b, name_a
        d = Difference(-d.diff, -d.high, -d.low, d.df, d.n_b, d.n_a)
    return (
        f"{name_a} above {name_b} ({d.diff:+.{digits}f}, {LEVEL:.0%} CI [{d.low:.{digits}f}, "
        f"{d.high:.{digits}f}], Welch t, {seeds})"
    )


def value_at(xs: list[float], ys: list[float], x: float) -> float:
    """The curve (xs increasing) at x by linear interpolation; the end values outside its range."""
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            span = xs[i] - xs[i - 1]
            w = (x - xs[i - 1]) / span if span > 0 else 1.0
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return ys[-1]


def mean_over(xs: list[float], ys: list[float], start: float, end: float) -> float:
    """The area under the interpolated curve from start to end, divided by end - start: the curve's mean
    over that budget (its value at `end` when the budget has no width)."""
    if end <= start:
        return value_at(xs, ys, end)
    grid = [start] + [x for x in xs if start < x < end] + [end]
    values = [value_at(xs, ys, x) for x in grid]
    area = sum((grid[i] - grid[i - 1]) * (values[i] + values[i - 1]) / 2 for i in range(1, len(grid)))
    return area / (end - start)


# ---- time to a threshold, right-censored: a run that never reaches it is known only to need more --------


@dataclass(frozen=True)
class Survival:
    """Time-to-event data of one method: one (time, reached) per seed; reached False = censored at `time`
    (the run ended, or its last eval came, before the event)."""

    times: list[float]
    reached: list[bool]

    @property
    def n(self) -> int:
        return len(self.times)


def km_median(data: Survival) -> float | None:
    """The Kaplan-Meier median time: the first event time at which the estimated share of runs still short
    of the event falls to 0.5 or below; None when it never does (too many runs censored before it)."""
    at_risk, surviving = data.n, 1.0
    for time in sorted(set(data.times)):
        events = sum(1 for t, r in zip(data.times, data.reached) if t == time and r)
        leaving = sum(1 for t in data.times if t == time)
        if events:
            surviving *= 1.0 - events / at_risk
            if surviving <= 0.5:
                return time
        at_risk -= leaving
    return None


def logrank_z(a: Survival, b: Survival) -> float | None:
    """The log-rank (Mantel-Cox) statistic as a z-score: (observed - expected events of `a`) / sqrt(var),
    summed over the distinct event times of both; positive when `a` reaches the event sooner than expected
    under no difference. None when no run of either reached it (nothing to compare)."""
    times = sorted({t for t, r in zip(a.times + b.times, a.reached + b.reached) if r})
    observed = expected = variance = 0.0
    for time in times:
        n_a = sum(1 for t in a.times if t >= time)
        n_b = sum(1 for t in b.times if t >= time)
        d_a = sum(1 for t, r in zip(a.times, a.reached) if t == time and r)
        d = d_a + sum(1 for t, r in zip(b.times, b.reached) if t == time and r)
        n = n_a + n_b
        observed += d_a
        expected += d * n_a / n
        if n > 1:
            variance += d * (n_a / n) * (n_b / n) * (n - d) / (n - 1)
    if not times or variance == 0:
        return None
    return (observed - expected) / math.sqrt(variance)


def logrank_test(a: Survival, b: Survival, max_exact: int = 20_000, seed: int = 0) -> tuple[float, float] | None:
    """(z, two-sided p) of the log-rank test of `a` against `b`, the p-value by permutation: the share of
    the relabellings of the pooled runs into groups of a.n and b.n whose |z| is at least the observed one
    (every relabelling when there are at most `max_exact`, else that many drawn with `seed`). Exact at the
    few seeds a comparison has, where the chi-square approximation is not to be trusted. None when
    `logrank_z` is."""
    z = logrank_z(a, b)
    if z is None:
        return None
    pooled = list(zip(a.times + b.times, a.reached + b.reached))
    indices = range(len(pooled))
    if math.comb(len(pooled), a.n) <= max_exact:
        splits = list(itertools.combinations(indices, a.n))
    else:
        rng = random.Random(seed)
        splits = [tuple(rng.sample(indices, a.n)) for _ in range(max_exact)]
    extreme = 0
    for chosen in splits:
        picked = set(chosen)
        first = [pooled[i] for i in chosen]
        rest = [pooled[i] for i in indices if i not in picked]
        z_perm = logrank_z(
            Survival([t for t, _ in first], [r for _, r in first]), Survival([t for t, _ in rest], [r for _, r in rest])
        )
        if z_perm is not None and abs(z_perm) >= abs(z) - 1e-12:
            extreme += 1
    return z, extreme / len(splits)
