"""Checkpoints written atomically and verified on load.

A checkpoint is a directory (`checkpoints/step_N/`, `checkpoints/final/`) holding everything a run
needs to continue exactly where it stopped:

    model.safetensors, config.json, tokenizer files   the policy (HF format, loadable by path)
    <name>/                                           other trained models (PPO's critic)
    optimizer.pt                                      {optimizer name: state_dict}
    training_state.pt                                 LR schedulers and RNG states (python, numpy,
                                                      torch, CUDA, the sampling generator)
    trainer_state.json                                step, data position, counters, algorithm state
    manifest.json                                     size and sha256 of every file above, written last

Files go to a hidden sibling temp dir that is renamed into place when complete, so a crash mid-write
leaves the previous checkpoints untouched; a directory without a matching manifest is reported as
incomplete or corrupt, naming the file, rather than loaded. A write that fails (a full disk) removes
its temp dir and raises the OSError behind it, so the caller can stop or go on with the older ones.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from models.heads import ScalarHeadModel

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names it and says what to do."""


# ------------------------------------------------------------------------------------ RNG states


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random stream a step draws from, as plain lists and tensors (loadable with weights_only)."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the global generator is an MT19937: its legacy state is a tuple
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state: dict[str, Any] = {
        "python": [version, list(keys), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in (generators or {}).items():
        generator.set_state(state["generators"][name])


# ------------------------------------------------------------------------------------ writing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path, step: int | None) -> None:
    files = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    body = json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=1)
    with open(directory / MANIFEST, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())


SHARDED_KEY = "__by_parameter_name__"  # in optimizer.pt: the states of a sharded (fsdp) run


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    tokenizer,
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
    extra_models: dict[str, ScalarHeadModel] | None = None,
    schedulers: list[Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    full_state: Any = None,
) -> Path:
    """Write model (HF format, safetensors), tokenizer, optimizer and scheduler states, RNG states and
    `state` (json) to `directory`, atomically.

    `extra_models`: name -> a model with `save(dir)` and `load_weights(dir)` (models.heads), written to
    `directory/name`. `generators`: the run's own sampling generators, saved with the global RNGs.
    `full_state`: an `parallel.fsdp.FullState`, the gathered weights and optimizer states of sharded
    models, written instead of the models' own (sharded) ones.
    A write that fails (a full disk) raises the OSError behind it (ENOSPC), whichever library wrote the
    file, once the partial temp dir is removed; the checkpoints already on disk are untouched.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
    try:
        _write_files(tmp, model, tokenizer, optimizers, state, extra_models, schedulers, generators, full_state)
        _write_manifest(tmp, state.get("step"))  # last: its presence means every other file is complete
        _move_into_place(tmp, directory)
    except Exception as err:
        cause = os_error_of(err)
        if cause is None or cause is err:
            raise
        raise cause from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial write never stays behind
    return directory


def _write_files(
    tmp: Path, model, tokenizer, optimizers, state, extra_models, schedulers, generators, full_state
) -> None:
    """Every file of a checkpoint but the manifest, into `tmp` (save_checkpoint's arguments)."""
    if full_state is None:
        model.save_pretrained(tmp, safe_serialization=True)
        optimizer_states = {name: opt.state_dict() for name, opt in optimizers.items()}
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=full_state.policy)
        optimizer_states = {SHARDED_KEY: True, **full_state.optimizers}
    tokenizer.save_pretrained(tmp)
    for name, extra in (extra_models or {}).items():
        extra.save(tmp / name, state_dict=None if full_state is None else full_state.extra_models[name])
    _torch_save(optimizer_states, tmp / "optimizer.pt")
    _torch_save(
        {"schedulers": [s.state_dict() for s in schedulers or []], "rng": rng_state(generators)},
        tmp / "training_state.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))


def _torch_save(obj: Any, path: Path) -> None:
    # through a Python file: a failed write then carries its OSError (torch's own writer reports a full disk
    # as "RuntimeError: unexpected pos")
    with open(path, "wb") as f:
        torch.save(obj, f)


def _move_into_place(tmp: Path, directory: Path) -> None:
    """Rename the complete temp dir to `directory`; an existing one (checkpoints/final) is swapped out."""
    if directory.exists():  # overwrite: swap, then drop the old copy
        old = directory.with_name(f".old-{directory.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) words an I/O error


def os_error_of(err: BaseException) -> OSError | None:
    """The OSError behind a failed write: `err` itself, one it was raised during (torch.save's RuntimeError),
    or the one a safetensors error names ('... No space left on device (os error 28)'); None otherwise."""
    seen: BaseException | None = err
    for _ in range(8):  # exception chains are short; the bound guards against a cycle
        if seen is None:
            return None
        if isinstance(seen, OSError):
            return seen
        if match := RUST_OS_ERROR.search(str(seen)):
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        seen = seen.__cause__ or seen.__context__
    return None


def describe_os_error(err: OSError) -> str:
    """'ENOSPC: No space left on device' (the errno's name and text), or the error's own words."""
    if err.errno is None:
        return str(err)
    return f"{errno.errorcode.get(err.errno, err.errno)}: {err.strerror or os.strerror(err.errno)}"


def checkpoint_step(directory: Path) -> int:
    return int(json.loads((Path(directory) / MANIFEST).read_text())["step"])


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step_N checkpoints under `root` (0 keeps all), and temp
    dirs of interrupted writes. `final` is never pruned. Returns the deleted paths."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".tmp-")]
    if keep_last > 0:
        steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
        removed += [p for _, p in steps[:-keep_last]]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# ------------------------------------------------------------------------------------ reading


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; raises CheckpointError naming what is wrong otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if directory.name.startswith(".tmp-"):
        raise CheckpointError(
            f"checkpoint {directory} is a partial write (the run stopped while saving it); "
            "resume from an earlier checkpoint"
        )
    if not (directory / MANIFEST).is_file():
        raise CheckpointError(
            f"checkpoint {directory} is incomplete: it has no {MANIFEST} (written last), so "
            "its write was interrupted or it predates verified checkpoints; resume from another one"
        )
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {directory} is corrupt: {MANIFEST} is unreadable") from None
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} is missing")
        if path.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint {directory} is corrupt: {name} has {path.stat().st_size} bytes, "
                f"expected {meta['bytes']} (truncated?)"
            )
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} does not match its checksum")
    return manifest


def _candidates(root: Path) -> list[Path]:
    names = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return [p for p in names if STEP_DIR.match(p.name) or p.name in ("final", ".old-final")]


def find_latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under `root` (a checkpoints/ dir); None if none.

    Incomplete or corrupt ones are skipped with a warning that names them.
    """
    root = Path(root)
    for path in (p for p in root.iterdir() if p.is_dir() and p.name.startswith(".tmp-")) if root.is_dir() else []:
        log.warning("ignoring %s: a checkpoint whose write was interrupted", path)
    best: tuple[int, int, Path] | None = None
    for path in _candidates(root):
        try:
            step = int(verify_checkpoint(path)["step"])
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            log.warning("skipping checkpoint: %s", e)
            continue
        key = (step, path.name == "final", path)  # at equal steps prefer final (same state)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume` names: None (start fresh), "auto" (the newest complete checkpoint
    of this run dir, or None), a checkpoint dir, or a run / checkpoints dir (its newest checkpoint)."""
    if resume in (None, ""):
        return None
    if resume == "auto":
        return find_latest_checkpoint(Path(run_dir) / "checkpoints")
    path = Path(resume).expanduser()
    if (path / MANIFEST).exists() or path.name.startswith(".tmp-") or STEP_DIR.match(path.name) or path.name == "final":
        verify_checkpoint(path)
        return path
    if not path.is_dir():
        raise CheckpointError(f"trainer.resume={resume}: no such checkpoint or run directory")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = find_latest_checkpoint(root)
    if found is None:
        raise CheckpointError(f"trainer.resume={resume}: no complete checkpoint under {root}")
    return found


def load_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    extra_models: dict[str, ScalarHeadModel] | None = None,
    schedulers: list[Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Verify `directory`, load it into the given objects in place and return its trainer_state.json.

    Restores weights, optimizer and scheduler states and every RNG state (global and `generators`).
    """
    from models.loading import load_weights_into, read_weights
    from parallel.fsdp import is_sharded, load_full_state

    directory = Path(directory)
    verify_checkpoint(directory)
    extra_models = extra_models or {}
    for name in extra_models:
        if not (directory / name).is_dir():
            raise CheckpointError(f"checkpoint {directory} has no {name}/ (saved by another algorithm?)")
    try:
        saved = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        by_name = bool(saved.pop(SHARDED_KEY, False))
        if set(saved) != set(optimizers):
            raise CheckpointError(
                f"checkpoint {directory} holds optimizers {sorted(saved)}, this run has "
                f"{sorted(optimizers)} (saved by another algorithm?)"
            )
        sharded = is_sharded(model)
        if by_name != sharded:
            saved_by, this_run = ("fsdp", "ddp or single") if by_name else ("single or ddp", "fsdp")
            raise CheckpointError(
                f"checkpoint {directory} was written by trainer.strategy={saved_by}, whose optimizer "
                f"states this run (trainer.strategy={this_run}) cannot take; resume it with the "
                f"strategy that wrote it, or start from its weights (model.source=local "
                f"model.path={directory})"
            )
        if sharded:
            weights = read_weights(directory)
            extra_weights = {name: extra.read_weights(directory / name) for name, extra in extra_models.items()}
            load_full_state(model, weights, extra_models, extra_weights, optimizers, saved)
        else:
            load_weights_into(model, directory)
            for name, extra in extra_models.items():
                extra.load_weights(directory / name)
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(saved[name])
        training = torch.load(directory / "training_state.pt", map_location="cpu", weights_only=True)
        for scheduler, sched_state in zip(schedulers or [], training["schedulers"]):
            scheduler.load_state_dict(sched_state)
        set_rng_state(training["rng"], generators)
    except ValueError as e:  # shapes or keys that do not fit this run's model
        raise CheckpointError(f"checkpoint {directory} does not fit this run: {e}") from None
    return json.loads((directory / "trainer_state.json").read_text())


def saved_wandb_run_id(directory: Path) -> str | None:
    """The wandb run id the checkpoint's run logged to (None for a run without wandb, or an older checkpoint),
    read before any model loads so that the resumed run's logger continues that run."""
    path = Path(directory) / "trainer_state.json"
    try:
        return json.loads(path.read_text()).get("wandb_run_id")
    except (OSError, json.JSONDecodeError):
        return None  # load_checkpoint reports a damaged checkpoint in its own words
