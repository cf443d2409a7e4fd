"""Data parallelism: collectives against single-process references on a real 2-process gloo group,
sharding and per-prompt sampling seeds, and (slow) torchrun runs against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from algorithms.advantages import group_advantages, whiten
from algorithms.batch_stats import global_masked_mean, global_whiten, sharded_group_advantages
from algorithms.rollout import draw_uniforms, generate_rollout
from conf.schema import ConfigError, LoraOptions, ModelConfig, TrainerConfig
from data.loading import PromptSampler
from models.decode import sample_token
from models.loading import load_causal_lm, load_tokenizer
from models.logprobs import completion_logprobs
from parallel.distributed import ShardedSampler, average_gradients, reduce_metrics, sync_hooks
from parallel.fsdp import is_sharded, shard_models
from tests.conftest import TINY as TINY_MODEL
from training.update import OptimTarget, minibatch_update

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


def _collectives(rank: int, init_file: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(0)  # the same full data on both ranks; each keeps its half
        x, mask = torch.randn(8, 5, generator=g), (torch.rand(8, 5, generator=g) > 0.3).long()
        rewards = torch.rand(8, generator=g)
        half = slice(rank * 4, rank * 4 + 4)
        out = {
            "whiten": global_whiten(x[half], mask[half]),
            "whiten_keep_mean": global_whiten(x[half], mask[half], shift_mean=False),
            "mean": global_masked_mean(x[half], mask[half]),
            "adv_batch": sharded_group_advantages(rewards[half], 2, "batch"),
            "adv_group": sharded_group_advantages(rewards[half], 2, "group"),
        }
        metrics = {
            "loss": float(rank),
            "completion/length_max": float(rank),
            "completion/length_min": float(rank),
            "tokens/generated": 10.0,
            "reward/format_failures": 1.0,
            "time/generate": float(rank + 1),
        }
        out["metrics"] = reduce_metrics(metrics)
        param = torch.nn.Parameter(torch.zeros(3))
        param.grad = torch.full((3,), float(rank + 1))
        none_grad = torch.nn.Parameter(torch.zeros(2))  # this rank skipped its backward: counted as zeros
        if rank == 0:
            none_grad.grad = torch.ones(2)
        out["finite"] = average_gradients([param, none_grad], finite=True)
        out["finite_one_failed"] = average_gradients([param, none_grad], finite=rank == 0)
        out["grads"] = (param.grad.clone(), none_grad.grad.clone())
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_collectives_match_one_process(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_collectives, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(8, 5, generator=g), (torch.rand(8, 5, generator=g) > 0.3).long()
    rewards = torch.rand(8, generator=g)
    both = lambda key: torch.cat([results[0][key], results[1][key]])  # noqa: E731
    torch.testing.assert_close(both("whiten"), whiten(x, mask))
    torch.testing.assert_close(both("whiten_keep_mean"), whiten(x, mask, shift_mean=False))
    x_masked_mean = (x * mask).sum() / mask.sum()
    for r in range(WORLD):
        torch.testing.assert_close(results[r]["mean"], x_masked_mean)
    torch.testing.assert_close(both("adv_batch"), group_advantages(rewards, 2, "batch"))
    torch.testing.assert_close(both("adv_group"), group_advantages(rewards, 2, "group"))
    assert (
        results[0]["metrics"]
        == results[1]["metrics"]
        == {
            "loss": 0.5,
            "completion/length_max": 1.0,
            "completion/length_min": 0.0,
            "tokens/generated": 20.0,
            "reward/format_failures": 2.0,
            "time/generate": 2.0,
        }
    )
    assert results[0]["finite"] and results[1]["finite"]
    assert not results[0]["finite_one_failed"] and not results[1]["finite_one_failed"]
    for r in range(WORLD):  # averaged twice: (1 + 2) / 2 = 1.5, then 1.5; (1 + 0) / 2 = 0.5, then 0.5
        torch.testing.assert_close(results[r]["grads"][0], torch.full((3,), 1.5))
        torch.testing.assert_close(results[r]["grads"][1], torch.full((2,), 0.5))


def _nan_on_one_rank(rank: int, init_file: str, results: dict) -> None:
    """A ddp update whose every micro-batch is non-finite on rank 1 only: that rank reports no loss statistics."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )  # a desynchronised collective fails, not hangs
    try:
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 1)
        target = OptimTarget(
            torch.optim.AdamW(layer.parameters(), lr=0.1), list(layer.parameters()), 1.0, **sync_hooks("ddp")
        )
        batch = {"x": torch.randn(4, 3), "prompt_mask": torch.ones(4, 1), "completion_mask": torch.ones(4, 3)}

        def loss_fn(micro, share):
            loss = layer(micro["x"]).sum() * share.sequences * (float("nan") if rank == 1 else 1.0)
            return loss, {"loss": loss.detach(), "clip_frac": torch.tensor(0.25)}

        stats = minibatch_update(batch, loss_fn, [target], 1, 4, 2, shuffle=False)
        results[rank] = {"keys": sorted(stats), "reduced": reduce_metrics(stats)}
    finally:
        dist.destroy_process_group()


def test_a_non_finite_micro_batch_on_one_rank_keeps_the_metric_reduction_in_step(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_nan_on_one_rank, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    assert "loss" in results[0]["keys"] and "loss" not in results[1]["keys"]  # the ranks report different keys
    reduced = results[0]["reduced"]
    assert results[1]["reduced"] == reduced  # ... and reduce the same ones to the same values
    assert reduced["clip_frac"] == 0.25  # a key is averaged over the ranks that have it
    assert reduced["skipped_steps"] == 1.0 and reduced["optimizer_steps"] == 0.0  # every rank skipped the step


def test_sharded_sampler_splits_the_global_batch_and_seeds_do_not_depend_on_the_world():
    rows = [{"id": str(i)} for i in range(10)]
    single = ShardedSampler(PromptSampler(rows, 4, seed=3), rank=0, world=1)
    shards = [ShardedSampler(PromptSampler(rows, 4, seed=3), rank=r, world=2) for r in range(2)]
    for _ in range(4):  # 16 rows: crosses an epoch boundary of the 10 rows
        batch = single.draw()
        halves = [s.draw() for s in shards]
        assert halves[0].rows + halves[1].rows == batch.rows
        assert halves[0].seeds + halves[1].seeds == batch.seeds
        assert len(set(batch.seeds)) == 4
    assert shards[0].state_dict() == single.state_dict()


def test_per_prompt_noise_does_not_depend_on_the_batch():
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = draw_uniforms(3, 2, 5, gens([1, 2, 3]), torch.device("cpu"))  # 3 prompts x G=2, 5 steps
    apart = torch.cat(
        [
            draw_uniforms(1, 2, 5, gens([1]), torch.device("cpu")),
            draw_uniforms(2, 2, 5, gens([2, 3]), torch.device("cpu")),
        ]
    )
    assert together.shape == (6, 5) and torch.equal(together, apart)


def test_draws_follow_the_distribution():
    logits = torch.tensor([[0.1, 0.6, 0.3]]).log().repeat(8000, 1)
    uniform = draw_uniforms(1, 8000, 1, [torch.Generator().manual_seed(0)], torch.device("cpu"))[:, 0]
    token, logp = sample_token(logits, uniform, temperature=1.0, top_p=1.0)
    torch.testing.assert_close(
        torch.bincount(token, minlength=3) / 8000.0, torch.tensor([0.1, 0.6, 0.3]), atol=0.02, rtol=0
    )
    torch.testing.assert_close(logp, torch.tensor([0.1, 0.6, 0.3]).log()[token])


def _sharded_passes(rank: int, init_file: str, results: dict) -> None:
    """Per rank: a rollout and completion log-probs on the unsharded tiny model, then the same on it sharded.
    The ranks disagree on what FSDP's collectives need alike: rank 0 samples 4 tokens, rank 1 samples 9;
    rank 0's batch repeats a prompt, rank 1's does not."""
    torch.set_num_threads(1)
    # a rank stuck in a collective the other never joins fails the test instead of hanging it
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        cfg = ModelConfig(name="tiny_llama", **TINY_MODEL)
        tokenizer = load_tokenizer(cfg)
        model = load_causal_lm(cfg, tokenizer)
        rows = [{"prompt": p} for p in (["Hi.", "Hello there."] if rank == 0 else ["Bye.", "See you soon."])]
        sampling = {
            "rows": rows,
            "group_size": 2 - rank,
            "max_new_tokens": 4 + 5 * rank,
            "prompt_seeds": [rank, 7 + rank],
        }

        def passes() -> tuple[torch.Tensor, torch.Tensor]:
            rollout = generate_rollout(model, tokenizer, **sampling)
            with torch.no_grad():
                logp, _ = completion_logprobs(
                    model, rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1]
                )
            return rollout.completion_ids, logp

        plain = passes()
        shard_models("fsdp", model, None)
        assert is_sharded(model)
        results[rank] = {"plain": plain, "sharded": passes()}
    finally:
        dist.destroy_process_group()


def test_sharded_model_samples_and_scores_like_the_unsharded_one(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_sharded_passes, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        (ids, logp), (sharded_ids, sharded_logp) = results[rank]["plain"], results[rank]["sharded"]
        assert ids.shape[0] == 4 - 2 * rank
        assert torch.equal(ids, sharded_ids)
        torch.testing.assert_close(sharded_logp, logp, atol=1e-5, rtol=1e-5)


# ---- torchrun ------------------------------------------------------------------------------------

TINY = [
    "model=tiny_llama",
    "trainer.max_steps=2",
    "algo.max_new_tokens=8",
    "algo.prompts_per_step=2",
    "algo.minibatch_size=4",
    "algo.micro_batch_size=2",
    "data.eval_size=2",
    "trainer.eval_batch_size=2",
    "trainer.threads=1",
    "trainer.device=cpu",
    "trainer.lr=1e-3",
    # a reward that varies on a random model's text (DAPO's overlong penalty on its ~10-15 tokens of
    # characters), so the advantages are not all 0
    "+reward.weights.length=1.0",
    "+reward.options.length.max_tokens=14",
    "+reward.options.length.buffer=10",
]


def launch(args: list[str], run_dir: Path, nproc: int | None) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_SILENT": "true",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if nproc is None:
        cmd = [sys.executable, str(ROOT / "run.py")]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(ROOT / "run.py"),
        ]
    proc = subprocess.run(
        [*cmd, *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def train_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "loss" in m]


def compare_one_and_two_processes(
    tmp_path: Path, args: list[str], keys: tuple[str, ...], strategy: str = "ddp"
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    launch([*args, "trainer.prompt_seeded_sampling=true"], one, None)
    launch([*args, f"trainer.strategy={strategy}"], two, nproc=2)
    m1, m2 = train_metrics(one), train_metrics(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2]
    for a, b in zip(m1, m2):
        # equal-length completions make every token mean over ranks equal the global one
        assert a["completion/length_min"] == a["completion/length_max"] == 8, "a completion ended early"
        assert a["tokens/generated"] == b["tokens/generated"]
        assert a["reward/total_mean"] == pytest.approx(b["reward/total_mean"], abs=1e-6)
        assert a["reward/total_std"] > 0, "no reward signal: the comparison would be trivial"
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key
        # the groups were balanced over the ranks (algo.balance_ranks) before any pass
        assert "ranks/load_spread" not in a
        assert 1.0 <= b["ranks/load_spread"] <= b["ranks/load_spread_before"]
    w1 = load_file(one / "checkpoints" / "final" / "model.safetensors")
    w2 = load_file(two / "checkpoints" / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()
    init = load_causal_lm(ModelConfig(name="tiny_llama", **TINY_MODEL)).state_dict()
    moved = max(float((w1[k] - init[k]).abs().max()) for k in w1)
    differ = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert differ < 0.01 * moved, f"weights moved by {moved} in training but differ by {differ} between the runs"
    if (one / "checkpoints" / "final" / "critic").exists():  # PPO's critic head too
        h1, h2 = (load_file(d / "checkpoints" / "final" / "critic" / "head.safetensors") for d in (one, two))
        torch.testing.assert_close(h1["weight"], h2["weight"], rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_torchrun_grpo_matches_one_process(tmp_path):
    compare_one_and_two_processes(
        tmp_path,
        ["algo=grpo", "algo.group_size=2", *TINY],
        ("loss", "kl", "clip_frac", "advantages/abs_mean", "grad_norm/actor", "entropy"),
    )


@pytest.mark.slow
def test_torchrun_ppo_matches_one_process(tmp_path):
    compare_one_and_two_processes(
        tmp_path,
        ["algo=ppo", "algo.group_size=2", *TINY],
        ("loss", "value_loss", "kl", "grad_norm/actor", "grad_norm/critic", "returns/mean"),
    )


@pytest.mark.slow
@pytest.mark.parametrize("packed", [[], ["algo.micro_batch_tokens=40"]], ids=["padded", "packed"])
def test_torchrun_fsdp_grpo_matches_one_process(tmp_path, packed):
    # packed: micro-batches by tokens, which every rank must cut alike (training.update.set_micro_batch_agreement)
    compare_one_and_two_processes(
        tmp_path,
        ["algo=grpo", "algo.group_size=2", *TINY, *packed],
        ("loss", "kl", "clip_frac", "advantages/abs_mean", "grad_norm/actor", "entropy"),
        strategy="fsdp",
    )


@pytest.mark.slow
def test_torchrun_fsdp_ppo_matches_one_process(tmp_path):
    compare_one_and_two_processes(
        tmp_path,
        ["algo=ppo", "algo.group_size=2", *TINY],
        ("loss", "value_loss", "kl", "grad_norm/actor", "grad_norm/critic", "returns/mean"),
        strategy="fsdp",
    )


@pytest.mark.slow
def test_torchrun_fsdp_resume_is_exact_and_other_strategies_refuse_its_optimizer(tmp_path):
    args = ["algo=ppo", "algo.group_size=2", *TINY, "trainer.strategy=fsdp"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch([*args, "trainer.save_every=1"], full, nproc=2)
    launch([*args, f"trainer.resume={full / 'checkpoints' / 'step_1'}"], resumed, nproc=2)
    assert [m["step"] for m in train_metrics(resumed)] == [2]
    a, b = train_metrics(full)[1], train_metrics(resumed)[0]
    for key in ("loss", "value_loss", "kl", "grad_norm/actor", "grad_norm/critic", "reward/total_mean"):
        assert a[key] == b[key], key
    for sub in ("model.safetensors", "critic/model.safetensors", "critic/head.safetensors"):
        w1, w2 = (load_file(d / "checkpoints" / "final" / sub) for d in (full, resumed))
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1), sub
    single = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            *args[:-1],
            f"trainer.resume={full / 'checkpoints' / 'step_1'}",
            f"hydra.run.dir={tmp_path / 'single'}",
        ],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert single.returncode == 2
    assert "written by trainer.strategy=fsdp" in single.stderr and "resume it with the strategy" in single.stderr


def test_the_process_group_waits_trainer_dist_timeout_min(monkeypatch):
    from parallel import distributed

    calls = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: calls.update(kwargs))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 1)
    distributed.init_distributed("ddp", "cpu", timeout_min=90)
    assert calls == {"backend": "gloo", "timeout": timedelta(minutes=90)}
    assert TrainerConfig().dist_timeout_min == 60  # NCCL's watchdog would abort a 10-minute checkpoint write
    with pytest.raises(ConfigError, match=r"trainer\.dist_timeout_min"):
        TrainerConfig(dist_timeout_min=0)


def test_fsdp_refuses_lora():
    with pytest.raises(ConfigError, match=r"trainer.strategy=ddp"):
        TrainerConfig(strategy="fsdp", lora=LoraOptions(enabled=True))


def test_strategy_errors_say_what_to_do(monkeypatch):
    from algorithms.grpo import GRPOConfig
    from conf.schema import Config, ConfigError, DataConfig, LoggerConfig, RewardConfig, TrainerConfig
    from parallel.distributed import init_distributed, local_algo_config

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node=N"):
        init_distributed("ddp", "cpu")
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node=N"):
        init_distributed("fsdp", "cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="choose one of: ddp"):
        init_distributed("single", "cpu")
    cfg = Config(
        model=ModelConfig(),
        data=DataConfig(),
        reward=RewardConfig(),
        trainer=TrainerConfig(),
        algo=GRPOConfig(prompts_per_step=4, minibatch_size=6),
        logger=LoggerConfig(),
    )
    assert local_algo_config(cfg, 2).algo.minibatch_size == 3
    with pytest.raises(ConfigError, match=r"algo.minibatch_size=6 does not split over 4 ranks"):
        local_algo_config(cfg, 4)
