"""The faults a long run meets, injected on the CPU: out of memory in an update, a full disk while
saving a checkpoint, wandb unreachable, a reward that hangs. None loses a completed checkpoint or a
logged metric line. (CombinedReward's time limit itself: tests/rewards/test_reward_timeout.py.)"""

from __future__ import annotations

import errno
import io
import json
import logging
import threading

import pytest
import torch
from safetensors import SafetensorError

from conf.schema import LoggerConfig
from rewards import CombinedReward
from run import run_cli
from tests.training.test_nan_guard import GROUPS, config, logged, make_trainer
from training.checkpoint import find_latest_checkpoint, load_checkpoint, verify_checkpoint
from training.interrupts import TrainingError
from training.tracking import RunLogger
from training.update import MicroBatch, OptimTarget, OutOfMemoryStop, minibatch_update

GRPO = [*GROUPS["grpo"], "algo.micro_batch_size=4"]  # 2 prompts x 2 samples: one minibatch of 4 per step


def injected_oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


class OOMAt:
    """Fault injection: torch.OutOfMemoryError from the chosen forwards of `model` (1-based, counted
    separately for update forwards, in train mode with grad, and for the rest: sampling, no-grad passes)."""

    def __init__(self, model: torch.nn.Module, update_calls=(), other_calls=(), update_from: int | None = None):
        self.update_calls, self.other_calls, self.update_from = set(update_calls), set(other_calls), update_from
        self.update_count = self.other_count = 0
        model.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        if module.training and torch.is_grad_enabled():
            self.update_count += 1
            if self.update_count in self.update_calls or (self.update_from and self.update_count >= self.update_from):
                raise injected_oom()
        else:
            self.other_count += 1
            if self.other_count in self.other_calls:
                raise injected_oom()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ out of memory


def test_an_oom_in_the_update_halves_the_micro_batch_and_matches_an_update_at_that_size(tmp_path, tokenizer, caplog):
    oom, oom_log = make_trainer(tokenizer, tmp_path / "oom", [*GRPO, "trainer.max_steps=2"])
    hook = OOMAt(oom.policy.model, update_calls={1})  # step 1's update, its first forward
    with caplog.at_level(logging.WARNING):
        oom.fit()
    oom_log.finish()
    small, small_log = make_trainer(
        tokenizer, tmp_path / "small", [*GROUPS["grpo"], "algo.micro_batch_size=2", "trainer.max_steps=2"]
    )
    small.fit()
    small_log.finish()

    # step 1: the forward of 4 rows fails, redone as 2 x 2 rows; step 2: 2 x 2 rows
    assert hook.update_count == 1 + 2 + 2
    a, b = weights(oom.policy), weights(small.policy)
    # the retry starts the minibatch over from zero gradients: the update is the one at micro-batch 2
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    metrics = logged(tmp_path / "oom")
    assert metrics[1]["oom/retries"] == 1 and metrics[1]["oom/micro_batch_size"] == 2
    assert metrics[2]["oom/retries"] == 0 and metrics[2]["oom/micro_batch_size"] == 2  # the smaller size stays
    assert metrics[1]["optimizer_steps"] == 1 and metrics[1]["skipped_steps"] == 0  # one step, not two
    warnings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 1 and "micro_batch_size=4" in warnings[0] and "micro_batch_size=2" in warnings[0]
    # in the checkpoint: resumes at 2
    assert oom.algo.state_dict()["micro_batch"] == {"size": 2, "retries": 1, "tokens": 0}


def test_retrying_a_minibatch_discards_its_partial_gradients_and_steps_once():
    """minibatch_update alone, OOM in the second minibatch after its first micro-batch's backward: the
    weights equal an uninterrupted update at the halved size (to accumulation rounding) and the
    optimiser steps once per minibatch."""
    torch.manual_seed(0)
    # the rollout layout minibatch_update slices (x 3-D: not a token column that trim_padding cuts)
    batch = {
        "x": torch.randn(8, 3, 1),
        "y": torch.randn(8),
        "prompt_mask": torch.ones(8, 1),
        "completion_mask": torch.ones(8, 1),
    }

    def run(micro_batch, fail_at=()):
        model = torch.nn.Linear(3, 1)
        torch.nn.init.constant_(model.weight, 0.5)
        torch.nn.init.zeros_(model.bias)
        target = OptimTarget(torch.optim.SGD(model.parameters(), lr=0.1), list(model.parameters()), 1e9)
        calls = [0]

        def loss_fn(micro, share):
            calls[0] += 1
            if calls[0] in fail_at:
                raise injected_oom()
            loss = ((model(micro["x"].squeeze(-1)).squeeze(-1) - micro["y"]) ** 2).mean()
            return loss * share.sequences, {"loss": loss.detach()}

        stats = minibatch_update(
            batch, loss_fn, [target], num_epochs=1, minibatch_size=4, micro_batch=micro_batch, shuffle=False
        )
        return model, stats, calls[0]

    micro = MicroBatch(2, max_retries=2)
    # minibatch 1: calls 1, 2 (2 rows each); minibatch 2: call 3 and its backward, call 4 fails: redone from zero
    # gradients as calls 5-8 (1 row each)
    retried, stats, calls = run(micro, fail_at={4})
    uninterrupted, _, _ = run(1)
    assert calls == 8 and micro.size == 1 and micro.retries == 1
    assert stats["optimizer_steps"] == 2 and stats["oom/retries"] == 1 and stats["oom/micro_batch_size"] == 1
    for p, q in zip(retried.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_micro_batch_limits_and_resume():
    micro = MicroBatch(8, max_retries=2)
    micro.back_off("oom")
    micro.back_off("oom")
    with pytest.raises(OutOfMemoryStop, match=r"micro_batch_size=2 after 2 halving\(s\) \(trainer.max_oom_retries=2\)"):
        micro.back_off("oom")
    with pytest.raises(OutOfMemoryStop, match="micro_batch_size=1 after 0"):
        MicroBatch(1, max_retries=5).back_off("oom")
    resumed = MicroBatch(8, max_retries=2)
    resumed.load_state_dict(json.loads(json.dumps(micro.state_dict())))  # through json, as the loop saves
    assert (resumed.size, resumed.retries) == (2, 2)
    lowered = MicroBatch(1, max_retries=2)  # the user lowered algo.micro_batch_size to resume
    lowered.load_state_dict(micro.state_dict())
    assert lowered.size == 1
    old = MicroBatch(8)
    old.load_state_dict(None)  # a checkpoint from before the back-off
    assert old.size == 8


def test_oom_at_micro_batch_1_stops_with_one_line_naming_the_last_checkpoint(tmp_path, tokenizer):
    trainer, logger = make_trainer(
        tokenizer, tmp_path, [*GROUPS["grpo"], "algo.micro_batch_size=2", "trainer.max_steps=4", "trainer.save_every=1"]
    )
    OOMAt(trainer.policy.model, update_from=5)  # steps 1, 2: two micro-batches each; then every update forward
    with pytest.raises(TrainingError) as stop:
        trainer.fit()
    logger.finish()
    message = str(stop.value)
    assert "\n" not in message
    assert "out of memory in step 3: the update ran out of memory at micro_batch_size=1 after 1 halving" in message
    root = tmp_path / "checkpoints"
    assert f"the last checkpoint is {root / 'step_2'} (intact)" in message
    assert f"trainer.resume={root / 'step_2'}" in message
    assert find_latest_checkpoint(root) == root / "step_2" and not (root / "step_3").exists()
    verify_checkpoint(root / "step_2")
    assert sorted(logged(tmp_path)) == [1, 2]  # every completed step's line, nothing of step 3


def test_an_oom_outside_the_update_stops_with_one_line(tmp_path, tokenizer):
    trainer, logger = make_trainer(tokenizer, tmp_path, [*GRPO, "trainer.max_steps=2"])
    OOMAt(trainer.policy.model, other_calls={1})  # the first sampling forward
    with pytest.raises(
        TrainingError,
        match=r"out of memory in step 1 outside the update's micro-batches .*"
        r"no checkpoint was written",
    ):
        trainer.fit()
    logger.finish()


# ------------------------------------------------------------------------------------ full disk


def full_disk_in_torch_save(monkeypatch, fail_on: int) -> None:
    """torch.save writes half its bytes and raises ENOSPC on its `fail_on`-th call (a checkpoint writes two
    files with it: optimizer.pt, training_state.pt)."""
    real_save, calls = torch.save, [0]

    def save(obj, file, *args, **kwargs):
        calls[0] += 1
        if calls[0] != fail_on:
            return real_save(obj, file, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        file.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def full_disk_in_safetensors(monkeypatch, fail_on: int) -> None:
    """model.safetensors: safetensors reports a full disk as SafetensorError('... (os error 28)')."""
    import transformers.modeling_utils as modeling_utils

    real_save, calls = modeling_utils.safe_save_file, [0]

    def save(tensors, filename, *args, **kwargs):
        calls[0] += 1
        if calls[0] != fail_on:
            return real_save(tensors, filename, *args, **kwargs)
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", save)


@pytest.mark.parametrize("inject", [full_disk_in_torch_save, full_disk_in_safetensors])
def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_stops_with_one_line(
    tmp_path, tokenizer, monkeypatch, inject
):
    trainer, logger = make_trainer(tokenizer, tmp_path, [*GRPO, "trainer.max_steps=3", "trainer.save_every=1"])
    inject(monkeypatch, fail_on=3 if inject is full_disk_in_torch_save else 2)  # in step 2's checkpoint
    with pytest.raises(TrainingError) as stop:
        trainer.fit()
    logger.finish()
    root = tmp_path / "checkpoints"
    message = str(stop.value)
    assert "\n" not in message
    assert f"could not write checkpoint {root / 'step_2'} (ENOSPC: No space left on device)" in message
    assert f"the last checkpoint is {root / 'step_1'} (intact)" in message
    assert [p.name for p in root.iterdir()] == ["step_1"]  # the partial temp dir is gone
    verify_checkpoint(root / "step_1")
    monkeypatch.undo()
    fresh, fresh_log = make_trainer(tokenizer, tmp_path / "fresh", GRPO)
    assert fresh.resume(root / "step_1") == 1  # usable
    fresh_log.finish()
    assert {1, 2} <= set(logged(tmp_path))  # step 2 was logged before its checkpoint failed


def test_checkpoint_errors_warn_goes_on_training(tmp_path, tokenizer, monkeypatch, caplog):
    trainer, logger = make_trainer(
        tokenizer, tmp_path, [*GRPO, "trainer.max_steps=3", "trainer.save_every=1", "trainer.checkpoint_errors=warn"]
    )
    full_disk_in_torch_save(monkeypatch, fail_on=3)  # step 2's checkpoint
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    logger.finish()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["final", "step_1", "step_3"]
    warnings = [r.getMessage() for r in caplog.records if "could not write checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and "step_2" in warnings[0] and "trainer.checkpoint_errors=warn" in warnings[0]
    metrics = logged(tmp_path)
    assert [metrics[s]["checkpoint/failed_saves_total"] for s in (1, 2, 3)] == [0, 0, 1]
    for name in ("step_1", "step_3", "final"):
        verify_checkpoint(root / name)
    fresh, fresh_log = make_trainer(tokenizer, tmp_path / "fresh", GRPO)
    load_checkpoint(root / "step_3", fresh.policy, fresh.optimizers)
    fresh_log.finish()


# ------------------------------------------------------------------------------------ wandb


@pytest.fixture()
def fresh_wandb():
    """wandb keeps its settings and login in a process-wide singleton: each test starts from none, as a run does."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


def no_wandb_server_env(monkeypatch, tmp_path, api_key: str | None) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no stored login either
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    if api_key is None:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    else:
        monkeypatch.setenv("WANDB_API_KEY", api_key)


def test_wandb_online_without_a_reachable_server_logs_offline(tmp_path, monkeypatch, caplog, capsys, fresh_wandb):
    # a key of the right form, so that wandb really tries its server (there is no network here)
    no_wandb_server_env(monkeypatch, tmp_path, api_key="0" * 40)
    with caplog.at_level(logging.WARNING):
        logger = RunLogger(LoggerConfig(mode="online", init_timeout_s=3), tmp_path, {}, run_name="r", group="g")
    logger.log({"loss": 1.0}, step=1)
    logger.finish()
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wandb:")]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "did not answer within logger.init_timeout_s=3s" in warnings[0] and "wandb sync" in warnings[0]
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and str(offline[0]) in warnings[0]
    assert f"`wandb sync {offline[0]}`" in capsys.readouterr().out  # the sync command at the end
    assert logged(tmp_path)[1]["loss"] == 1.0


def test_wandb_online_without_an_api_key_runs_offline(tmp_path, monkeypatch, caplog, capsys, fresh_wandb):
    no_wandb_server_env(monkeypatch, tmp_path, api_key=None)
    with caplog.at_level(logging.WARNING):
        code, _ = run_cli(
            config([*GRPO, "trainer.max_steps=1", "trainer.save_final=false", "logger.mode=online"]), tmp_path
        )
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wandb:")]
    assert len(warnings) == 1 and "`wandb login` or set WANDB_API_KEY" in warnings[0]
    assert "wandb sync" in out.out and list((tmp_path / "wandb").glob("offline-run-*"))
    assert 1 in logged(tmp_path)


# ------------------------------------------------------------------------------------ a hung reward


def test_a_hung_reward_scores_zero_and_is_counted_per_step(tmp_path, tokenizer):
    release = threading.Event()

    def hangs(prompts, completions, **_):
        release.wait(30)  # a reward service that does not answer
        return [1.0] * len(completions)

    def reward(_):
        return CombinedReward({"hangs": 1.0, "format_soft": 1.0}, extra={"hangs": hangs}, timeout_s=0.2)

    trainer, logger = make_trainer(tokenizer, tmp_path, [*GRPO, "trainer.max_steps=2"], wrap=reward)
    try:
        trainer.fit()
    finally:
        release.set()  # lets the abandoned thread end
    logger.finish()
    metrics = logged(tmp_path)
    for step in (1, 2):  # step 2 does not call it again while step 1's call still runs
        assert metrics[step]["reward/hangs_timeouts"] == 4 and metrics[step]["reward/hangs_mean"] == 0
        assert metrics[step]["reward/format_soft_timeouts"] == 0 and metrics[step]["reward/hangs_failures"] == 0
    assert metrics[2]["time/step"] < 10
