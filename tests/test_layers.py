"""The layers of the tree (DESIGN.md): imports point down only, and the algorithm layer does no file I/O.

    run.py, experiments/  ->  stages/  ->  algorithms/  ->  training/  ->  parallel/
                          ->  models/, rewards/, data/  ->  conf/

A module may import its own layer and the layers below it; an import that points up (training/
importing algorithms/, say) fails here with the file, the line and the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "conf": 0,
    "models": 1,
    "rewards": 1,
    "data": 1,
    "parallel": 2,
    "training": 3,
    "algorithms": 4,
    "stages": 5,
    "experiments": 6,
    "run": 6,
}
# calls that read or write files: none of them belongs in algorithms/ (the math, the rollout, the update)
FILE_IO = {
    "open",
    "read_text",
    "write_text",
    "read_bytes",
    "write_bytes",
    "save",
    "load",
    "dump",
    "mkdir",
    "save_pretrained",
    "from_pretrained",
    "save_file",
    "load_file",
}


def modules() -> list[Path]:
    files = [ROOT / "run.py"]
    for package in LAYERS:
        if (ROOT / package).is_dir():
            files += sorted((ROOT / package).rglob("*.py"))
    return files


def layer_of(module: str) -> int | None:
    return LAYERS.get(module.split(".")[0])


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every project import in `path`, at any depth (function-local ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, m) for line, m in found if layer_of(m) is not None]


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path):
    own = LAYERS[path.relative_to(ROOT).parts[0].removesuffix(".py")]
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {m} (layer {layer_of(m)} > {own})"
        for line, m in imports(path)
        if layer_of(m) > own
    ]
    assert not upward, "imports must point down a layer or stay in it:\n" + "\n".join(upward)


@pytest.mark.parametrize("path", sorted((ROOT / "algorithms").glob("*.py")), ids=lambda p: p.name)
def test_algorithms_do_no_file_io(path: Path):
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in FILE_IO:
                calls.append(f"{path.name}:{node.lineno} calls {name}()")
    assert not calls, (
        "algorithms/ is the math, the rollout and the update; file I/O belongs in training/ or "
        "stages/:\n" + "\n".join(calls)
    )


def test_the_detector_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef f():\n    from algorithms.grpo import GRPO\n")
    assert imports(bad) == [(4, "algorithms.grpo")] and layer_of("algorithms.grpo") > LAYERS["training"]
