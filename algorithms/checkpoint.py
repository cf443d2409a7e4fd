"""Checkpoints written atomically: into a temporary directory, renamed into place when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    tokenizer,
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
    extra_models: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """Write model (HF format, safetensors), tokenizer, optimizer states and `state` (json) to `directory`.

    `extra_models`: name -> a model with `save(dir)` (PPO's critic, models.heads), written to `directory/name`.

    A reader never sees a half-written checkpoint: the files go to a sibling temp dir first, and a
    crash mid-write leaves the previous checkpoint of the same name untouched.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        for name, extra in (extra_models or {}).items():
            extra.save(tmp / name)
        if directory.exists():
            old = directory.with_name(f".old-{directory.name}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
