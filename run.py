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
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from algorithms.evaluation import run_eval
from algorithms.grpo import build_grpo
from algorithms.pipeline import run_pipeline
from algorithms.ppo import build_ppo
from algorithms.rejection_sampling import rejection_sample
from algorithms.reward_model import train_reward_model
from algorithms.sft import train_sft
from algorithms.tracking import RunLogger
from algorithms.trainer import Trainer
from conf.schema import Config, ConfigError, validate
from data.loading import PromptSampler, attach_prompts, load_examples
from models.loading import ModelLoadError, load_causal_lm, load_tokenizer
from rewards import build_reward
from rewards.reward_model import reward_extras

ROOT = Path(__file__).resolve().parent
# algo.name -> build(cfg, policy, tokenizer, reward_fn, generator) -> (algorithm, {name: optimizer})
RL_BUILDERS = {"grpo": build_grpo, "ppo": build_ppo}
# the stages besides RL that score samples with the configured rewards
SCORING_STAGES = ("eval", "rejection_sampling")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    return torch.device(name)


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
    generator = seed_everything(cfg.seed)
    device = pick_device(cfg.trainer.device)

    tokenizer = load_tokenizer(cfg.model)
    policy = load_causal_lm(cfg.model, tokenizer).to(device)
    train_rows, eval_rows, skipped = load_data(cfg, tokenizer)
    print(f"data: {len(train_rows)} train / {len(eval_rows)} eval prompts; skipped rows: {skipped or 'none'}")
    reward_fn = None  # built before the logger starts a run, so that a bad reward config fails first
    if cfg.algo.name in RL_BUILDERS or cfg.algo.name in SCORING_STAGES:  # (reward_model, sft: none needed)
        reward_fn = build_reward(cfg.reward, extra=reward_extras(cfg.reward, device))

    logger = RunLogger(cfg.logger, run_dir, resolved, run_name=run_dir.name, group=cfg.experiment_name)
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
        eval_sampling = {"max_new_tokens": cfg.algo.max_new_tokens, "temperature": cfg.algo.temperature,
                         "top_p": cfg.algo.top_p}
        trainer = Trainer(cfg.trainer, algo, sampler, eval_rows, logger, run_dir, policy, tokenizer, reward_fn,
                          optimizers, eval_sampling, cfg.seed)
        return trainer.fit()
    finally:
        logger.finish()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(raw: DictConfig) -> float | None:
    try:
        cfg = validate(raw)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        final = run(cfg, run_dir, OmegaConf.to_container(raw, resolve=True), HydraConfig.get().overrides.task)
    except (ConfigError, ModelLoadError, ValueError) as err:
        # a clear one-line reason, not a traceback, for what the user can fix
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for key in ("reward/total_mean", "eval/rm/accuracy", "eval/reward/total_mean", "eval/sft/loss",
                "rs/acceptance_rate"):
        if key in final:
            return final[key]  # a sweeper's objective
    return None


if __name__ == "__main__":
    main()
