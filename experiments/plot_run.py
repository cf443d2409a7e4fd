"""Plot one run's learning curves from its metrics.jsonl and print the quarter-by-quarter means
(every run already writes <run dir>/curves.png at its end; this redraws it, e.g. into another file).

    python experiments/plot_run.py outputs/grpo/<run> [--out curve.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from training.plots import CURVES_FILE, curve_keys, load_train_metrics, plot_curves, quarter_means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help=f"PNG path (default: <run_dir>/{CURVES_FILE})")
    args = parser.parse_args()
    rows = load_train_metrics(args.run_dir)
    if not rows:
        sys.exit(f"error: {args.run_dir / 'metrics.jsonl'} has no training steps")
    out = plot_curves(rows, args.out or args.run_dir / CURVES_FILE, title=str(args.run_dir))
    for key in curve_keys(rows):
        means = quarter_means([r[key] for r in rows if r.get(key) is not None])
        print(f"{key:32s} quarters: " + "  ".join(f"{m:.3f}" for m in means))
    print(f"steps: {len(rows)}  wall time: {sum(r.get('time/step', 0) for r in rows):.0f} s  plot: {out}")


if __name__ == "__main__":
    main()
