"""Checkpoints: a kill in the middle of a write leaves the previous checkpoint loadable and the partial
one detected; corrupt files are named; keep_last prunes; RNG states round-trip."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from training.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)


def trained(model) -> torch.optim.AdamW:
    """One AdamW step so that the optimiser has state and the weights moved."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def save(root, name, model, tokenizer, optimizer, step, generator=None):
    return save_checkpoint(
        root / name,
        model,
        tokenizer,
        {"actor": optimizer},
        {"step": step},
        generators={"sampling": generator} if generator else None,
    )


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, tiny_model, tokenizer):
    optimizer = trained(tiny_model)
    root = tmp_path / "checkpoints"
    save(root, "step_1", tiny_model, tokenizer, optimizer, 1)
    saved = {k: v.clone() for k, v in tiny_model.state_dict().items()}

    pid = os.fork()
    if pid == 0:  # the child trains on, then is killed (SIGKILL: no cleanup runs) halfway through a write
        try:
            with torch.no_grad():
                for p in tiny_model.parameters():
                    p.add_(1.0)
            real_save = torch.save

            def killed_midway(obj, file, *args, **kwargs):
                real_save(obj, file, *args, **kwargs)
                file.flush()  # checkpoints hand torch.save an open file (so that a full disk raises OSError)
                os.truncate(file.name, os.path.getsize(file.name) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = killed_midway
            save(root, "step_2", tiny_model, tokenizer, optimizer, 2)
        finally:
            os._exit(1)  # not reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-step_2")]
    assert len(partial) == 1 and not (root / "step_2").exists()
    with pytest.raises(CheckpointError, match=r"partial write.*earlier checkpoint"):
        resolve_resume(str(partial[0]), tmp_path)

    latest = resolve_resume("auto", tmp_path)
    assert latest == root / "step_1"
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.zero_()
    load_checkpoint(latest, tiny_model, {"actor": optimizer})
    assert all(torch.equal(v, saved[k]) for k, v in tiny_model.state_dict().items())

    assert prune_checkpoints(root, keep_last=3) == partial  # the next save clears the leftover
    assert [p.name for p in root.iterdir()] == ["step_1"]


def test_incomplete_and_corrupt_checkpoints_are_named(tmp_path, tiny_model, tokenizer):
    optimizer = trained(tiny_model)
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save(root, f"step_{step}", tiny_model, tokenizer, optimizer, step)

    weights = root / "step_3" / "model.safetensors"
    with open(weights, "r+b") as f:  # a flipped byte: same size, wrong checksum
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=r"step_3 is corrupt: model\.safetensors does not match its checksum"):
        resolve_resume(str(root / "step_3"), tmp_path)
    with open(root / "step_2" / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match=r"step_2 is corrupt: optimizer\.pt has 10 bytes, expected \d+"):
        load_checkpoint(root / "step_2", tiny_model, {"actor": optimizer})
    (root / "step_1" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"step_1 is incomplete: it has no manifest\.json"):
        resolve_resume(str(root / "step_1"), tmp_path)

    assert find_latest_checkpoint(root) is None  # auto skips all three
    with pytest.raises(CheckpointError, match="no complete checkpoint under"):
        resolve_resume(str(tmp_path), tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_keep_last_and_latest(tmp_path, tiny_model, tokenizer):
    optimizer = trained(tiny_model)
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8, 10):
        save(root, f"step_{step}", tiny_model, tokenizer, optimizer, step)
    save(root, "final", tiny_model, tokenizer, optimizer, 10)
    prune_checkpoints(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["final", "step_10", "step_8"]
    assert find_latest_checkpoint(root) == root / "final"  # the same step: the final one
    prune_checkpoints(root, keep_last=0)  # 0 keeps all
    assert len(list(root.iterdir())) == 3


def test_rng_states_round_trip(tmp_path, tiny_model, tokenizer):
    optimizer = trained(tiny_model)
    generator = torch.Generator().manual_seed(7)
    torch.randn(3, generator=generator)
    save(tmp_path, "ckpt", tiny_model, tokenizer, optimizer, 1, generator)

    def draws():
        return (
            random.random(),
            float(np.random.rand()),
            float(torch.rand(1)),
            float(torch.rand(1, generator=generator)),
        )

    expected = draws()
    draws()
    load_checkpoint(tmp_path / "ckpt", tiny_model, {"actor": optimizer}, generators={"sampling": generator})
    assert draws() == expected


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path, tiny_model, tokenizer):
    from conf.schema import ModelConfig
    from models.loading import load_causal_lm

    save(tmp_path, "ckpt", tiny_model, tokenizer, trained(tiny_model), 1)
    narrower = ModelConfig(name="tiny_llama", source="random", tokenizer="embedded", hidden_size=32)
    wider = load_causal_lm(narrower, tokenizer)
    with pytest.raises(CheckpointError, match=r"ckpt does not fit this run: .*other shape \['model.embed_tokens"):
        load_checkpoint(tmp_path / "ckpt", wider, {"actor": torch.optim.AdamW(wider.parameters())})
