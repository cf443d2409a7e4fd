"""experiments/gpu_pack.py: its manifest and the GPU machine's package list cover the GPU path's imports, and a
pack made by `make gpu-pack` (when one is there; nothing is downloaded here) fits and matches the manifest."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import pytest

from experiments.gpu_pack import (
    MAX_BYTES,
    check_wheel,
    folder_bytes,
    normalize,
    read_machine_packages,
    read_manifest,
    wheel_name_version,
)

ROOT = Path(__file__).resolve().parents[2]
# the project's packages on the GPU path (experiments/gpu_check.py runs run.py and experiments/*.py)
PACKAGES = ("conf", "algorithms", "models", "training", "rewards", "data", "stages", "parallel", "experiments")
OWN = {*PACKAGES, "run"}
# import names that packages_distributions() of this venv does not map to a distribution
DISTRIBUTION_OF = {"trl": "trl"}
# imports that the GPU path never executes (each lazy, inside the function that needs it)
NOT_ON_GPU_PATH = {
    "wandb",  # training.tracking imports it only when logger.mode != disabled; gpu_check passes logger.mode=disabled
    "submitit",  # parallel.distributed, under hydra/launcher=slurm only
    "trl",  # experiments/bench_logprobs.py (and bench_step.py): trl's log-softmax row, when trl is installed
}
DEFAULT_PACK = ROOT / "outputs" / "gpu_pack"


def gpu_path_files() -> list[Path]:
    return [ROOT / "run.py", *(p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py")))]


def third_party_imports() -> dict[str, set[str]]:
    """Top-level names of the absolute imports of the GPU path's files that are neither the project's nor the
    standard library's -> the files importing each."""
    found: dict[str, set[str]] = {}
    for path in gpu_path_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in OWN and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_manifest_and_machine_cover_the_gpu_path_imports():
    imports = third_party_imports()
    assert {"torch", "transformers", "hydra", "omegaconf", "datasets"} <= set(imports)  # the walk found them
    mapping = importlib.metadata.packages_distributions()
    carried = {pin.name for pin in read_manifest()}
    machine = read_machine_packages()
    missing = {}
    for name, files in sorted(imports.items()):
        if name in NOT_ON_GPU_PATH:
            continue
        distributions = mapping.get(name) or [DISTRIBUTION_OF.get(name, name)]
        if not any(normalize(d) in carried or normalize(d) in machine for d in distributions):
            missing[name] = (distributions, sorted(files)[:3])
    assert not missing, f"imports on the GPU path that neither the pack nor the machine provides: {missing}"
    # every exclusion is still imported somewhere (otherwise drop it from the list)
    assert set(imports) >= NOT_ON_GPU_PATH


def test_manifest_pins_only_what_the_machine_lacks():
    pins = read_manifest()
    names = [pin.name for pin in pins]
    assert len(names) == len(set(names)), "one version of each: two stop the whole install"
    assert not set(names) & set(read_machine_packages())
    assert all(pin.version and pin.version[0].isdigit() for pin in pins)
    # hydra-core and omegaconf need antlr4-python3-runtime 4.9.*, which PyPI has as an sdist only
    antlr = next(pin for pin in pins if pin.name == "antlr4-python3-runtime")
    assert antlr.sdist and antlr.version.startswith("4.9.")


def test_machine_list_reads():
    machine = read_machine_packages()
    assert machine["torch"] == "2.11.0" and machine["transformers"] == "5.17.0"
    assert "hydra-core" not in machine and "datasets" not in machine and "wandb" not in machine
    assert machine["jinja2"] is None


@pytest.mark.skipif(not DEFAULT_PACK.is_dir(), reason="no pack: `make gpu-pack` makes one (it downloads)")
def test_pack_fits_and_matches_the_manifest():
    assert folder_bytes(DEFAULT_PACK) <= MAX_BYTES
    wheels = sorted((DEFAULT_PACK / "wheels").glob("*.whl"))
    assert sorted(wheel_name_version(p) for p in wheels) == sorted((p.name, p.version) for p in read_manifest())
    for path in wheels:
        check_wheel(path)
    assert (DEFAULT_PACK / "run.sh").exists()
    model = DEFAULT_PACK / "model"
    assert (model / "config.json").exists() and (model / "tokenizer.json").exists()
    assert not list(model.glob("*.safetensors")) and not list(model.glob("*.gguf"))  # no weights travel
