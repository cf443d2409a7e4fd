"""Render text as a PNG, for README pictures of text outputs: a run's summary.md, or the last samples table of
its offline wandb run (read from the run's files/media/table/*.table.json), as plain monospaced text.

    python experiments/text_figure.py summary <run dir> OUT.png
    python experiments/text_figure.py samples <run dir> OUT.png [--rows 4] [--width 60]
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure


def samples_text(run_dir: Path, rows: int, width: int) -> str:
    """The newest samples table of the run's newest offline wandb run, one block per sample."""
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))[-1]
    tables = sorted(
        (offline / "files" / "media" / "table").glob("samples_*.table.json"), key=lambda p: int(p.name.split("_")[1])
    )
    table = json.loads(tables[-1].read_text())
    lines = [f"wandb table 'samples' ({tables[-1].relative_to(run_dir)}), {len(table['data'])} rows; first {rows}:", ""]
    for row in table["data"][:rows]:
        record = dict(zip(table["columns"], row, strict=True))
        prompt = record["prompt"].split("user\n")[-1].split("<|im_end|>")[0].strip()
        lines.append("prompt:     " + textwrap.shorten(prompt, width))
        lines.append("completion: " + textwrap.shorten(record["completion"], width))
        numbers = [
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in record.items()
            if k not in ("prompt", "completion")
        ]
        lines += textwrap.wrap(", ".join(numbers), width + 12) + [""]
    return "\n".join(lines)


def render(text: str, out: Path) -> None:
    lines = text.splitlines()
    fig = Figure(figsize=(max(len(line) for line in lines) * 0.075 + 0.4, len(lines) * 0.19 + 0.4))
    fig.text(0.01, 0.99, text, family="monospace", fontsize=9, va="top")
    fig.savefig(out, dpi=110, facecolor="white")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("summary", "samples"))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--width", type=int, default=88)
    args = parser.parse_args()
    text = (
        (args.run_dir / "summary.md").read_text()
        if args.what == "summary"
        else samples_text(args.run_dir, args.rows, args.width)
    )
    render(text, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
