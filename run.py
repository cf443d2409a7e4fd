"""Entry point: compose conf/, build the pieces, run one stage.

    python run.py algo=grpo
    python run.py algo=ppo model=tiny_llama trainer.max_steps=2
    python run.py -m algo=ppo,grpo seed=0,1,2
    python run.py algo=reward_model                      # writes <run_dir>/reward_model
    python run.py algo=grpo reward=reward_model reward.path=<run_dir>/reward_model
    python run.py algo=sft data=medical_o1                 # cold-start SFT -> <run_dir>/checkpoints/final
    python run.py algo=eval model.source=local model.path=<run_dir>/checkpoints/final algo.before_path=embedded
    python run.py algo=rejection_sampling model.source=local model.path=<checkpoint>   # -> <run_dir>/sft_rows.jsonl
    python run.py experiment=r1_pipeline                  # sft -> grpo -> rejection sampling -> sft -> grpo
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from algorithms.checkpoint import CheckpointError, resolve_resume
from algorithms.distributed import (NullLogger, ShardedAlgorithm, ShardedSampler, init_distributed,
                                    is_main_process, local_algo_config, shutdown)
from algorithms.evaluation import run_eval
from algorithms.grpo import build_grpo
from algorithms.interrupts import TrainingError, TrainingInterrupted
from algorithms.pipeline import run_pipeline
from algorithms.ppo import build_ppo
from algorithms.rejection_sampling import rejection_sample
from algorithms.reward_model import train_reward_model
from algorithms.sft import train_sft
from algorithms.tracking import RunLogger
from algorithms.trainer import Trainer
from conf.schema import Config, ConfigError, check_override_keys, validate
from data.loading import DataUnavailable, PromptSampler, attach_prompts, load_examples
from models.loading import ModelLoadError, load_causal_lm, load_tokenizer
from models.scale import model_config_for, prepare_policy
from rewards import build_reward
from rewards.reward_model import reward_extras

ROOT = Path(__file__).resolve().parent
# algo.name -> build(cfg, policy, tokenizer, reward_fn, generator) -> (algorithm, {name: optimizer})
RL_BUILDERS = {"grpo": build_grpo, "ppo": build_ppo}
# what a user can fix: reported as one line, not a traceback (HYDRA_FULL_ERROR=1 shows the traceback)
USER_ERRORS = (ConfigError, ModelLoadError, ValueError, CheckpointError, TrainingError, DataUnavailable,
               FileNotFoundError)
# the stages besides RL that score samples with the configured rewards
SCORING_STAGES = ("eval", "rejection_sampling")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def load_data(cfg: Config, tokenizer) -> tuple[list[dict], list[dict], dict[str, int]]:
    train, evals, skipped = load_examples(cfg.data, ROOT)
    train, skipped_train = attach_prompts(train, tokenizer, cfg.data)
    evals, skipped_eval = attach_prompts(evals, tokenizer, cfg.data)
    for counts in (skipped_train, skipped_eval):
        for reason, n in counts.items():
            skipped[reason] = skipped.get(reason, 0) + n
    if not train:
        raise ValueError(f"no training prompts left after filtering (skipped: {skipped})")
    return train, evals, skipped


def run(cfg: Config, run_dir: Path, resolved: dict, overrides: list[str] | tuple = ()) -> dict[str, float]:
    if cfg.algo.name == "pipeline":  # a driver of run.py stages: it loads no model itself
        return run_pipeline(cfg, run_dir, list(overrides), ROOT / "run.py")
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    dist_ctx = init_distributed(cfg.trainer.strategy, cfg.trainer.device)  # torchrun's ranks, or one process
    scale_options = {"trainer.strategy": dist_ctx.strategy != "single",
                     "trainer.lora.enabled": cfg.trainer.lora.enabled,
                     "trainer.resume": bool(cfg.trainer.resume)}
    for key, used in scale_options.items():
        if used and cfg.algo.name not in RL_BUILDERS:
            raise ConfigError(f"{key} applies to the RL stages ({', '.join(RL_BUILDERS)}); for algo={cfg.algo.name} "
                              f"leave it at its default")
    checkpoint = resolve_resume(cfg.trainer.resume, run_dir)  # first: a bad path fails before any model loads
    if dist_ctx.strategy != "single":
        cfg = local_algo_config(cfg, dist_ctx.world_size)  # global batch sizes -> this rank's share
    generator = seed_everything(cfg.seed)  # the same on every rank: identical initial weights
    device = dist_ctx.device
    model_cfg = model_config_for(cfg.model, cfg.trainer)  # trainer.precision

    tokenizer = load_tokenizer(model_cfg)
    policy = load_causal_lm(model_cfg, tokenizer).to(device)
    policy = prepare_policy(policy, cfg.model, cfg.trainer)  # checkpointing, LoRA
    train_rows, eval_rows, skipped = load_data(cfg, tokenizer)
    print(f"data: {len(train_rows)} train / {len(eval_rows)} eval prompts; skipped rows: {skipped or 'none'}")
    reward_fn = None  # built before the logger starts a run, so that a bad reward config fails first
    if cfg.algo.name in RL_BUILDERS or cfg.algo.name in SCORING_STAGES:  # (reward_model, sft: none needed)
        reward_fn = build_reward(cfg.reward, extra=reward_extras(cfg.reward, device))

    if is_main_process():
        logger = RunLogger(cfg.logger, run_dir, resolved, run_name=run_dir.name, group=cfg.experiment_name)
    else:  # rank 0 alone logs; the metrics it logs are reduced over all ranks
        logger = NullLogger()
    logger.log({f"data/skipped_{k}": float(v) for k, v in skipped.items()} | {
        "data/train_prompts": float(len(train_rows)), "data/eval_prompts": float(len(eval_rows))}, step=0)
    try:
        if cfg.algo.name == "reward_model":
            return train_reward_model(cfg, policy, tokenizer, train_rows, eval_rows, logger, run_dir, generator)
        if cfg.algo.name == "sft":
            return train_sft(cfg, policy, tokenizer, train_rows, eval_rows, logger, run_dir, generator)
        if cfg.algo.name == "eval":
            return run_eval(cfg, policy, tokenizer, train_rows, eval_rows, reward_fn, logger, run_dir)
        if cfg.algo.name == "rejection_sampling":
            return rejection_sample(cfg, policy, tokenizer, train_rows, reward_fn, logger, run_dir, generator)
        algo, optimizers = RL_BUILDERS[cfg.algo.name](cfg, policy, tokenizer, reward_fn, generator)
        sampler = PromptSampler(train_rows, algo.prompts_per_step, seed=cfg.seed)
        if dist_ctx.strategy != "single" or cfg.trainer.prompt_seeded_sampling:
            sampler = ShardedSampler(sampler, dist_ctx.rank, dist_ctx.world_size)
            algo = ShardedAlgorithm(algo, sampler, dist_ctx.strategy)
        eval_sampling = {"max_new_tokens": cfg.algo.max_new_tokens, "temperature": cfg.algo.temperature,
                         "top_p": cfg.algo.top_p}
        trainer = Trainer(cfg.trainer, algo, sampler, eval_rows, logger, run_dir, policy, tokenizer, reward_fn,
                          optimizers, eval_sampling, cfg.seed, generator)
        if checkpoint is not None:
            print(f"resuming from {checkpoint} (step {trainer.resume(checkpoint)})")
        elif cfg.trainer.resume == "auto":
            print(f"trainer.resume=auto: no checkpoint in {run_dir / 'checkpoints'} yet, starting fresh")
        return trainer.fit()
    finally:
        logger.finish()
        shutdown()


def run_cli(raw: DictConfig, run_dir: Path, overrides: list[str] | tuple = ()) -> tuple[int, dict[str, float]]:
    """Validate and run; (exit code, last metrics). Errors the user can fix and interruptions are
    reported in one line on stderr instead of a traceback."""
    try:
        cfg = validate(raw)
        return 0, run(cfg, run_dir, OmegaConf.to_container(raw, resolve=True), overrides)
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        return stop.exit_code, {}
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: nothing was saved
        print("interrupted: no checkpoint written by this stop (earlier ones are intact)", file=sys.stderr)
        return 128 + signal.SIGINT, {}
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2, {}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(raw: DictConfig) -> float | None:
    code, final = run_cli(raw, Path(HydraConfig.get().runtime.output_dir), HydraConfig.get().overrides.task)
    if code:
        sys.exit(code)
    for key in ("reward/total_mean", "eval/rm/accuracy", "eval/reward/total_mean", "eval/sft/loss",
                "rs/acceptance_rate"):
        if key in final:
            return final[key]  # a sweeper's objective
    return None


def default_algo(overrides: list[str]) -> str:
    """The algo that runs without `algo=...`: an experiment preset's `override /algo`, else conf/config.yaml's."""
    sources = [ROOT / "conf" / "config.yaml"]
    for arg in overrides:
        if arg.startswith("experiment=") and "," not in arg:
            sources.insert(0, ROOT / "conf" / "experiment" / f"{arg.split('=', 1)[1]}.yaml")
    for source in sources:
        if not source.exists():
            continue  # an unknown preset: Hydra names the valid ones
        for entry in OmegaConf.load(source).get("defaults", []):
            if isinstance(entry, DictConfig):
                for key in ("algo", "override /algo"):
                    if key in entry:
                        return str(entry[key])
    return "grpo"


if __name__ == "__main__":
    try:
        check_override_keys(sys.argv[1:], default_algo(sys.argv[1:]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
