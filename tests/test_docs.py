"""The docs against the code: the README's config-group table against conf/, the algorithm and stage pages'
sections and generated-table markers, the result notes and their index, the site's nav.

`make docs` (mkdocs build --strict) checks the links and anchors; these check what mkdocs cannot see.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
RESULTS = DOCS / "results"

# every algorithm and stage page: the same sections in the same order (what it is and its paper, the command,
# its options, the metrics it logs, how it differs from its neighbours, results)
SECTIONS = ["What it is", "Command", "Options", "Metrics", "How it differs from its neighbours", "Results"]
PAGES = {  # page -> the algo choice (conf/algo/<name>.yaml) whose options it documents
    "algorithms/grpo.md": "grpo",
    "algorithms/ppo.md": "ppo",
    "algorithms/rloo.md": "rloo",
    "algorithms/reinforce_pp.md": "reinforce_pp",
    "stages/sft.md": "sft",
    "stages/reward_model.md": "reward_model",
    "stages/eval.md": "eval",
    "stages/rejection_sampling.md": "rejection_sampling",
    "stages/r1_pipeline.md": "pipeline",
}
CONFIG_PAGE_OPTIONS = ["model", "data", "reward", "trainer", "logger", "algo.rollout"]
NOTE_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})-[a-z0-9][a-z0-9-]*\.md$")


def conf_groups() -> dict[str, set[str]]:
    """Each config group under conf/ (a folder holding YAMLs, e.g. `hydra/launcher`) -> its choices."""
    groups: dict[str, set[str]] = {}
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        group = path.parent.relative_to(ROOT / "conf").as_posix()
        if group != "." and not group.startswith("schema"):
            groups.setdefault(group, set()).add(path.stem)
    return groups


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with `| header |`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def marker_pairs(text: str, name: str) -> list[str]:
    """The `<!-- name: X -->` ... `<!-- /name -->` pairs of a page, each marker on its own line: the X's."""
    lines = [line.strip() for line in text.splitlines()]
    found = []
    for i, line in enumerate(lines):
        match = re.fullmatch(rf"<!-- {name}: (\S+) -->", line)
        if match:
            assert f"<!-- /{name} -->" in lines[i + 1 :], f"<!-- {name}: {match[1]} --> is never closed"
            found.append(match[1])
    return found


def headings(text: str, level: str = "## ") -> list[str]:
    lines, in_code = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith(level):
            lines.append(line[len(level) :].strip())
    return lines


def notes() -> list[Path]:
    return sorted(p for p in RESULTS.glob("*.md") if p.name != "index.md")


def test_readme_is_the_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 200, "README.md is over 200 lines: move the detail into docs/"
    assert "make test" in text and "make demo" in text
    assert "data/DATA_LICENSE.md" in text


def test_readme_group_table_lists_every_group_and_choice_of_conf():
    rows = table_rows(README.read_text(), "group")
    table = {backticked(row[0])[0]: set(backticked(row[1])) for row in rows}
    assert table == conf_groups()


def test_readme_links_point_at_files_that_exist():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_every_algo_choice_has_a_page():
    assert set(PAGES.values()) == conf_groups()["algo"]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_algorithm_and_stage_pages_share_their_sections(page):
    text = (DOCS / page).read_text()
    assert headings(text) == SECTIONS, f"{page}: its ## sections must be {SECTIONS}"
    assert marker_pairs(text, "options") == [f"algo/{PAGES[page]}"]
    options = text.split("## Options", 1)[1].split("\n## ", 1)[0]
    assert "generated from the config's own help" in options
    outside = re.sub(r"<!-- options: \S+ -->.*?<!-- /options -->", "", options, flags=re.S)
    assert "|---" not in outside, f"{page}: the options table is generated, not written by hand"


def test_configuration_page_marks_every_group_table():
    text = (DOCS / "configuration.md").read_text()
    assert marker_pairs(text, "options") == CONFIG_PAGE_OPTIONS


def test_markers_appear_only_where_tables_are_generated():
    marked = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "<!-- options" in p.read_text()}
    assert marked == {*PAGES, "configuration.md"}


def test_shared_metrics_are_marked_once():
    pages = [p for p in DOCS.rglob("*.md") if "<!-- metrics" in p.read_text()]
    assert [p.relative_to(DOCS).as_posix() for p in pages] == ["metrics.md"]
    lines = [line.strip() for line in (DOCS / "metrics.md").read_text().splitlines()]
    assert lines.count("<!-- metrics -->") == 1
    assert lines.index("<!-- /metrics -->") > lines.index("<!-- metrics -->")


def test_experiments_page_lists_every_preset():
    rows = table_rows((DOCS / "experiments.md").read_text(), "preset")
    assert {backticked(row[0])[0] for row in rows} == conf_groups()["experiment"]


@pytest.mark.parametrize("note", notes(), ids=lambda p: p.name)
def test_result_note_says_when_where_and_how(note):
    match = NOTE_NAME.match(note.name)
    assert match, f"{note.name}: a result note is named YYYY-MM-DD-<slug>.md"
    text = note.read_text()
    assert text.startswith("# ")
    assert f"- Date: {match[1]}" in text, f"{note.name}: its Date line must match its name"
    for field in ("- Commit: `", "- Machine: ", "- Command"):
        assert field in text, f"{note.name}: no '{field}' line"


def test_results_index_lists_every_note_newest_first():
    index = (RESULTS / "index.md").read_text()
    listed = re.findall(r"\]\((\d{4}-\d{2}-\d{2}-[^)]+\.md)\)", index)
    assert sorted(listed) == [p.name for p in notes()], "docs/results/index.md must list every note once"
    dates = [name[:10] for name in listed]
    assert dates == sorted(dates, reverse=True), "docs/results/index.md lists the notes newest first"


def test_site_nav_holds_every_page():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(entries) -> list[str]:
        out = []
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            out += pages(value) if isinstance(value, list) else [value]
        return out

    in_nav = pages(nav)
    on_disk = [p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "assets" not in p.parts]
    assert sorted(in_nav) == sorted(on_disk)


def test_generated_tables_are_fresh():
    """The option tables and the shared-metric list are generated from the code; a change to a config field's
    help or default, or to algorithms.metrics, must be followed by `python experiments/gen_options.py`."""
    from experiments.gen_options import stale_pages

    assert stale_pages() == [], "stale generated tables: run python experiments/gen_options.py"
