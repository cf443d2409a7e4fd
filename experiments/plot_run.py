"""Plot one run's learning curves from its metrics.jsonl and print the quarter-by-quarter means.

    python experiments/plot_run.py outputs/grpo/<run> [--out curve.png]
"""

from __future__ import annotations

import argparse
import json
from itertools import pairwise
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def load_train_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("reward/total_mean") is not None]


def quarter_means(values: list[float]) -> list[float]:
    """Means of the four consecutive quarters of a curve (the last quarter takes any remainder)."""
    q = max(len(values) // 4, 1)
    bounds = [0, q, 2 * q, 3 * q, len(values)]
    return [sum(values[a:b]) / max(b - a, 1) for a, b in pairwise(bounds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <run_dir>/curves.png)")
    args = parser.parse_args()
    rows = load_train_metrics(args.run_dir)
    steps = [r["step"] for r in rows]
    parts = sorted(k for k in rows[-1] if k.startswith("reward/") and k.endswith("_mean"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in parts:
        axes[0].plot(steps, [r.get(key) for r in rows], label=key.removeprefix("reward/").removesuffix("_mean"))
    axes[0].set(title="reward (per component, unweighted; total = weighted sum)", xlabel="step")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, [r.get("kl") for r in rows])
    axes[1].set(title="KL to reference (k3)", xlabel="step")
    axes[2].plot(steps, [r.get("completion/length_mean") for r in rows])
    axes[2].set(title="completion length (tokens)", xlabel="step")
    fig.tight_layout()
    out = args.out or args.run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    for key in parts:
        means = quarter_means([r[key] for r in rows])
        print(f"{key:32s} quarters: " + "  ".join(f"{m:.3f}" for m in means))
    print(f"steps: {len(rows)}  wall time: {sum(r.get('time/step', 0) for r in rows):.0f} s  plot: {out}")


if __name__ == "__main__":
    main()
