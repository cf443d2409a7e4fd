"""Write the docs' generated tables from the code: the option tables from the config's own help, the shared
metrics from their declarations.

    python experiments/gen_options.py           # rewrite the tables in docs/
    python experiments/gen_options.py --check   # exit 1 naming the pages whose tables are stale (the tests run it)

A page asks for a table with a marker pair, each marker on its own line:
`<!-- options: algo/grpo -->` (an algo choice's options as `python run.py algo=grpo` composes them; the rollout's
are on the configuration page), `<!-- options: trainer -->` (a group's, under the default `python run.py`),
`<!-- options: algo.rollout -->` (a nested config), `<!-- metrics -->` (algorithms.metrics.SHARED_METRICS).
What stands between the markers is replaced.
"""

from __future__ import annotations

import argparse
import re
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from algorithms.metrics import SHARED_METRICS  # noqa: E402
from conf.help import OptionRow, format_value, option_rows  # noqa: E402
from conf.registry import discover  # noqa: E402
from conf.schema import Config, compose_config  # noqa: E402

DOCS = ROOT / "docs"
MARKER = re.compile(r"^<!-- (options: (\S+)|metrics) -->$")
NESTED_ELSEWHERE = ("rollout",)  # algo.rollout.* has one table, on the configuration page
# a choice that does not validate alone is shown as its preset composes it (the pipeline needs its stage list)
COMPOSED_WITH = {"pipeline": ["experiment=r1_pipeline"]}


@cache
def composed(choice: str | None = None) -> Config:
    return compose_config([f"algo={choice}", *COMPOSED_WITH.get(choice, [])] if choice else [])


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def options_table(rows: list[OptionRow]) -> list[str]:
    lines = ["| option | type | default | help |", "|---|---|---|---|"]
    for row in rows:
        value = cell(format_value(row.value))
        lines.append(f"| `{row.key}` | {cell(row.type)} | `{value}` | {cell(row.help)} |")
    return lines


def table_for(spec: str) -> list[str]:
    """The table a marker asks for: `algo/<choice>`, a group (`trainer`) or a nested config (`algo.rollout`)."""
    if spec.startswith("algo/"):
        algo = composed(spec.split("/", 1)[1]).algo
        return options_table(list(option_rows(algo, "algo", skip=NESTED_ELSEWHERE)))
    obj = composed()
    for part in spec.split("."):
        obj = getattr(obj, part)
    return options_table(list(option_rows(obj, spec)))


def metrics_table() -> list[str]:
    lines = ["| metric | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {cell(meaning)} |" for name, meaning in SHARED_METRICS.items()]
    return lines


def render(text: str) -> str:
    """The page with every marked table regenerated."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        out.append(lines[i])
        match = MARKER.match(lines[i].strip())
        i += 1
        if not match:
            continue
        close = "<!-- /metrics -->" if match[1] == "metrics" else "<!-- /options -->"
        end = next((j for j in range(i, len(lines)) if lines[j].strip() == close), None)
        if end is None:
            raise ValueError(f"{lines[i - 1].strip()} is never closed by {close}")
        out += metrics_table() if match[1] == "metrics" else table_for(match[2])
        i = end
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def marked_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "<!-- options:" in p.read_text() or "<!-- metrics" in p.read_text())


def stale_pages() -> list[str]:
    """The pages whose generated tables differ from what the code says now."""
    discover()
    return [p.relative_to(ROOT).as_posix() for p in marked_pages() if render(p.read_text()) != p.read_text()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a table is stale")
    args = parser.parse_args()
    stale = stale_pages()
    if args.check:
        if stale:
            print("stale generated tables (run python experiments/gen_options.py): " + ", ".join(stale))
        return 1 if stale else 0
    for name in stale:
        path = ROOT / name
        path.write_text(render(path.read_text()))
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
