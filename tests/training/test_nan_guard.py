"""Non-finite losses: the update is skipped, counted and logged; K in a row stop the run with a clear
error and the last checkpoint intact. Degenerate batches (every completion empty or truncated, every
reward equal) give no NaN anywhere."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from conf.registry import get_stage
from conf.schema import validate
from data.loading import PromptSampler
from models.loading import load_causal_lm
from rewards import RewardOutput, build_reward
from run import load_data, run_cli
from training.checkpoint import find_latest_checkpoint, load_checkpoint
from training.interrupts import TrainingError
from training.loop import StageContext, Trainer
from training.tracking import RunLogger

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model=tiny_llama",
    "algo.max_new_tokens=6",
    "algo.prompts_per_step=2",
    "data.eval_size=2",
    "trainer.eval_batch_size=2",
    "logger.mode=disabled",
    "data.source=local",
    "trainer.log_samples=0",
]
GROUPS = {
    "grpo": ["algo=grpo", "algo.group_size=2", "algo.minibatch_size=4"],
    "ppo": ["algo=ppo", "algo.group_size=2", "algo.minibatch_size=4"],
}


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


class NaNRewardAt:
    """Fault injection: the wrapped reward, with NaN totals on the chosen calls (1-based steps)."""

    def __init__(self, reward, steps):
        self.reward, self.steps, self.calls = reward, steps, 0

    def __call__(self, prompts, completions, rows) -> RewardOutput:
        self.calls += 1
        out = self.reward(prompts, completions, rows)
        if self.calls in self.steps:
            out.total = torch.full_like(out.total, math.nan)
        return out


def make_trainer(tokenizer, run_dir: Path, overrides: list[str], wrap=lambda r: r, policy=None):
    """The pieces run.py builds, with the reward optionally wrapped."""
    cfg = validate(config(overrides))
    generator = torch.Generator().manual_seed(cfg.seed)
    policy = policy if policy is not None else load_causal_lm(cfg.model, tokenizer)
    train_rows, _eval_rows, _ = load_data(cfg, tokenizer)
    reward = wrap(build_reward(cfg.reward))
    logger = RunLogger(cfg.logger, run_dir, {}, run_name="test", group="test")
    ctx = StageContext(
        cfg,
        run_dir,
        policy=policy,
        tokenizer=tokenizer,
        train_rows=train_rows,
        reward_fn=reward,
        logger=logger,
        generator=generator,
    )  # no eval rows: evaluate() has nothing to do
    built = get_stage(cfg.algo.name).build(ctx)
    return Trainer(cfg.trainer, built, logger, run_dir, policy, tokenizer, generator), logger


def logged(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_a_nan_step_is_skipped_counted_and_the_run_goes_on(tmp_path, tokenizer):
    trainer, logger = make_trainer(
        tokenizer,
        tmp_path,
        [*GROUPS["grpo"], "trainer.max_steps=3", "trainer.save_every=1", "trainer.keep_last=0"],
        wrap=lambda r: NaNRewardAt(r, {2}),
    )
    trainer.fit()
    logger.finish()
    metrics = logged(tmp_path)
    assert [metrics[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 0]
    assert [metrics[s]["skipped_steps_consecutive"] for s in (1, 2, 3)] == [0, 1, 0]
    assert metrics[3]["skipped_steps_total"] == 1 and metrics[2]["optimizer_steps"] == 0
    steps = tmp_path / "checkpoints"
    weights = [load_file(steps / f"step_{s}" / "model.safetensors") for s in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 changed nothing
    assert all(torch.isfinite(w).all() for w in weights[2].values())
    adam_steps = [
        float(torch.load(steps / f"step_{s}" / "optimizer.pt")["actor"]["state"][0]["step"]) for s in (1, 2, 3)
    ]
    assert adam_steps == [1, 1, 2]  # step 3 updated again


def test_consecutive_nan_steps_stop_the_run_with_the_checkpoint_intact(tmp_path, tokenizer):
    trainer, logger = make_trainer(
        tokenizer,
        tmp_path,
        [*GROUPS["ppo"], "trainer.max_steps=6", "trainer.save_every=1", "trainer.max_consecutive_skips=2"],
        wrap=lambda r: NaNRewardAt(r, {3, 4, 5, 6}),
    )
    with pytest.raises(TrainingError, match=r"2 consecutive steps \(up to step 4\).*last checkpoint is .*step_3"):
        trainer.fit()
    logger.finish()
    root = tmp_path / "checkpoints"
    assert find_latest_checkpoint(root) == root / "step_3" and not (root / "final").exists()
    assert logged(tmp_path)[4]["skipped_steps_consecutive"] == 2
    fresh, _ = make_trainer(tokenizer, tmp_path / "fresh", GROUPS["ppo"])
    load_checkpoint(root / "step_3", fresh.policy, fresh.optimizers, fresh.algo.checkpoint_models())
    assert all(torch.isfinite(p).all() for p in fresh.policy.parameters())


def test_divergence_is_one_line_through_run_py(tmp_path, capsys):
    # a learning rate that sends the weights to 1e30 makes every later loss non-finite: a real divergence
    # (the entropy bonus has a gradient even while every reward, hence every advantage, is 0)
    # (PPO's actor and critic learning rates follow trainer.lr when null)
    code, _ = run_cli(
        config(
            [
                *GROUPS["ppo"],
                "trainer.lr=1e30",
                "algo.actor_lr=null",
                "algo.critic_lr=null",
                "algo.ent_coef=1.0",
                "trainer.max_steps=10",
                "trainer.max_consecutive_skips=2",
                "trainer.save_every=1",
            ]
        ),
        tmp_path,
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "non-finite loss or gradient" in line[0] and "trainer.lr" in line[0], err[-2000:]
    assert (tmp_path / "checkpoints" / "step_1" / "manifest.json").exists()


def eos_first(model, tokenizer):
    """A policy that ends every completion at once: a large EOS logit bias (an empty answer)."""
    bias = torch.zeros(model.lm_head.out_features)
    bias[tokenizer.eos_token_id] = 1e4
    model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    return model


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
@pytest.mark.parametrize("completions", ["empty", "truncated"])
def test_degenerate_batches_give_no_nan(tmp_path, tokenizer, tiny_model, algo, completions):
    policy = eos_first(tiny_model, tokenizer) if completions == "empty" else tiny_model
    # reward=keyword on a word the tiny model never writes: every group's rewards are identical
    trainer, logger = make_trainer(
        tokenizer,
        tmp_path,
        [*GROUPS[algo], "trainer.max_steps=2", "reward=keyword", "reward.options.keyword.keyword=zyzzyva"],
        policy=policy,
    )
    rollouts = []
    sample = trainer.algo.sample  # records each step's rollout
    trainer.algo.sample = lambda *args: (out := sample(*args), rollouts.append(out[0]))[0]
    trainer.fit()
    logger.finish()
    for rollout in rollouts:
        if completions == "empty":
            assert set(rollout.completions) == {""} and rollout.completion_lengths.max() == 1
        else:
            assert bool(rollout.truncated.all())
    for step_metrics in logged(tmp_path).values():
        for key, value in step_metrics.items():
            assert value is not None and math.isfinite(value), (key, value)  # the logger writes NaN as null
        if "reward/total_std" in step_metrics:
            assert step_metrics["reward/total_std"] == 0 and step_metrics["skipped_steps"] == 0
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())


def flaky(prompts, completions, id, **_):
    """Raises on odd rows, NaN on rows divisible by 4, else 1: a broken user reward."""
    if any(int(i) % 2 for i in id):
        raise RuntimeError("reward service timed out")
    return [math.nan if int(i) % 4 == 0 else 1.0 for i in id]


def test_a_raising_or_nan_reward_scores_zero_and_is_counted_in_training(tmp_path, tokenizer):
    from rewards import CombinedReward

    trainer, logger = make_trainer(
        tokenizer,
        tmp_path,
        [*GROUPS["grpo"], "trainer.max_steps=3"],
        wrap=lambda _: CombinedReward({"flaky": 1.0}, extra={"flaky": flaky}),
    )
    replay = PromptSampler(trainer.sampler.rows, 2, seed=0)  # the prompts each step drew, G=2 samples each
    expected = [2 * sum(int(r["id"]) % 2 == 1 or int(r["id"]) % 4 == 0 for r in replay.next_batch()) for _ in range(3)]
    trainer.fit()
    logger.finish()
    metrics = logged(tmp_path)
    assert [metrics[s]["reward/flaky_failures"] for s in (1, 2, 3)] == expected and sum(expected) > 0
    for step in (1, 2, 3):
        assert all(v is not None and math.isfinite(v) for v in metrics[step].values()), metrics[step]
        assert metrics[step]["reward/flaky_mean"] == pytest.approx(1 - expected[step - 1] / 4)
        assert metrics[step]["skipped_steps"] == 0
