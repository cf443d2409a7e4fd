"""A run's learning curves from its metrics.jsonl: the PNG every run writes at its end (training.summary)
and `python experiments/plot_run.py <run dir>` redraws.

Panels: the reward per component (or a supervised stage's loss and accuracy), KL to the reference,
completion length, entropy; a panel whose metric the run never logged is left out (SFT has no KL,
GRPO with beta 0 neither).
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

CURVES_FILE = "curves.png"
# keys a supervised stage logs per step in place of a reward (stages/sft.py, stages/reward_model.py)
STAGE_CURVE_SUFFIXES = ("/loss", "/accuracy")


def read_metrics_file(run_dir: Path) -> list[dict]:
    """Every record of <run_dir>/metrics.jsonl; a line cut short by a killed process is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def step_rows(rows: list[dict]) -> list[dict]:
    """The records of training steps (step >= 1 and a time/step), in step order: not the step-0 data and
    eval lines."""
    return sorted(
        (r for r in rows if r.get("step", 0) >= 1 and r.get("time/step") is not None), key=lambda r: r["step"]
    )


def load_train_metrics(run_dir: Path) -> list[dict]:
    """The training-step records of a run's metrics.jsonl."""
    return step_rows(read_metrics_file(run_dir))


def curve_keys(rows: list[dict]) -> list[str]:
    """The metrics whose course says how a run went: every reward component's mean (`reward/<part>_mean`,
    `total` first), else a supervised stage's `<stage>/loss` and `<stage>/accuracy`."""
    keys = {k for r in rows for k, v in r.items() if v is not None}
    rewards = sorted(
        k for k in keys if k.startswith("reward/") and k.endswith("_mean") and k != "reward/kl_penalty_mean"
    )  # the KL's share of the reward, not a component
    if rewards:
        return sorted(rewards, key=lambda k: k != "reward/total_mean")
    return sorted(k for k in keys if not k.startswith("eval/") and "/" in k and k.endswith(STAGE_CURVE_SUFFIXES))


def quarter_means(values: list[float]) -> list[float]:
    """Means of the four consecutive quarters of a curve (the last quarter takes any remainder; a curve of
    fewer than four points repeats its values)."""
    q = max(len(values) // 4, 1)
    bounds = [0, q, 2 * q, 3 * q, len(values)]
    return [sum(values[a:b]) / (b - a) if b > a else values[-1] for a, b in pairwise(bounds)]


def plot_curves(rows: list[dict], out: Path, title: str = "") -> Path | None:
    """Draw the curves of training-step records `rows` into the PNG `out`; None when there is nothing to draw."""
    if not rows:
        return None
    import matplotlib  # here: a run that never plots does not pay for the import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    main_keys = curve_keys(rows)
    panels = [
        (
            "reward (parts unweighted; total weighted)"
            if main_keys and main_keys[0].startswith("reward/")
            else "loss / accuracy",
            main_keys,
        )
    ]
    for title_, key in (
        ("KL to reference (per token)", "kl"),
        ("completion length (tokens)", "completion/length_mean"),
        ("entropy (nats / token)", "entropy"),
    ):
        if any(r.get(key) is not None for r in rows):
            panels.append((title_, [key]))
    panels = [(t, keys) for t, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (panel_title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            label = key.removeprefix("reward/").removesuffix("_mean")
            ax.plot(steps, [r.get(key) for r in rows], marker="." if len(rows) < 30 else None, label=label)
        ax.set(title=panel_title, xlabel="step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
