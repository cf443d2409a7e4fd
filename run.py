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
python run.py algo=ppo --help                         # every option of the chosen groups, its value and help
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from conf.registry import discover, get_stage, stage_names
from conf.schema import Config, ConfigError, check_override_keys, validate
from data.loading import DataUnavailable, attach_prompts, load_examples
from models.loading import ModelLoadError, load_causal_lm, load_tokenizer
from models.scale import model_config_for, prepare_policy
from parallel.distributed import (
    NullLogger,
    ShardedSampler,
    init_distributed,
    is_main_process,
    local_algo_config,
    shutdown,
)
from rewards import build_reward
from rewards.reward_model import reward_extras
from training.checkpoint import CheckpointError, resolve_resume, saved_wandb_run_id
from training.interrupts import TrainingError, TrainingInterrupted
from training.loop import StageContext, Trainer
from training.summary import summarize_run, write_summary
from training.tracking import RunLogger

discover()  # every algorithm and stage registers itself (conf.registry), before Hydra composes conf/
ROOT = Path(__file__).resolve().parent
# what a user can fix: reported as one line, not a traceback (HYDRA_FULL_ERROR=1 shows the traceback)
USER_ERRORS = (
    ConfigError,
    ModelLoadError,
    ValueError,
    CheckpointError,
    TrainingError,
    DataUnavailable,
    FileNotFoundError,
)


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


def check_scale_options(cfg: Config, strategy: str) -> None:
    """LoRA and data parallelism are RL options; resume is every looped stage's."""
    stage = get_stage(cfg.algo.name)
    rl = stage_names(kind="rl")
    options = {
        "trainer.strategy": (strategy != "single", rl),
        "trainer.lora.enabled": (cfg.trainer.lora.enabled, rl),
        "trainer.resume": (bool(cfg.trainer.resume), tuple(n for n in stage_names() if get_stage(n).looped)),
    }
    for key, (used, stages) in options.items():
        if used and stage.name not in stages:
            raise ConfigError(f"{key} applies to {', '.join(stages)}; for algo={stage.name} leave it at its default")


def run(cfg: Config, run_dir: Path, resolved: dict, overrides: list[str] | tuple = ()) -> dict[str, float]:
    stage = get_stage(cfg.algo.name)
    if stage.kind == "driver":  # the pipeline runs other stages through run.py: it loads no model itself
        return stage.run(StageContext(cfg, run_dir, list(overrides), ROOT))  # its summary lists its stages'
    started = time.perf_counter()
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    dist_ctx = init_distributed(
        cfg.trainer.strategy,
        cfg.trainer.device,  # torchrun's ranks, or one process
        cfg.trainer.dist_timeout_min,
    )
    check_scale_options(cfg, dist_ctx.strategy)
    checkpoint = resolve_resume(cfg.trainer.resume, run_dir)  # first: a bad path fails before any model loads
    if dist_ctx.strategy != "single":
        cfg = local_algo_config(cfg, dist_ctx.world_size)  # global batch sizes -> this rank's share
    generator = seed_everything(cfg.seed)  # the same on every rank: identical initial weights
    # trainer.precision; weights that train stay fp32 under a bf16 forward (models.scale)
    model_cfg = model_config_for(cfg.model, cfg.trainer, trains=stage.looped)

    tokenizer = load_tokenizer(model_cfg)
    policy = load_causal_lm(model_cfg, tokenizer, device=dist_ctx.device)
    policy = prepare_policy(policy, cfg.model, cfg.trainer, trains=stage.looped)  # checkpointing, LoRA, autocast
    train_rows, eval_rows, skipped = load_data(cfg, tokenizer)
    print(f"data: {len(train_rows)} train / {len(eval_rows)} eval prompts; skipped rows: {skipped or 'none'}")
    # built before the logger starts a run, so that a bad reward config fails first
    reward_fn = (
        build_reward(cfg.reward, extra=reward_extras(cfg.reward, dist_ctx.device)) if stage.uses_rewards else None
    )

    main_process = is_main_process()  # asked now: after shutdown() every process is a rank 0
    if main_process:  # a resumed run continues the wandb run its checkpoint logged to
        logger = RunLogger(
            cfg.logger,
            run_dir,
            resolved,
            run_name=run_dir.name,
            group=cfg.experiment_name,
            job_type=stage.name,
            resume_id=saved_wandb_run_id(checkpoint) if checkpoint else None,
        )
    else:  # rank 0 alone logs; the metrics it logs are reduced over all ranks
        logger = NullLogger()
    logger.log(
        {f"data/skipped_{k}": float(v) for k, v in skipped.items()}
        | {"data/train_prompts": float(len(train_rows)), "data/eval_prompts": float(len(eval_rows))},
        step=0,
    )
    ctx = StageContext(
        cfg,
        run_dir,
        list(overrides),
        ROOT,
        policy,
        tokenizer,
        train_rows,
        eval_rows,
        reward_fn,
        logger,
        generator,
        dist_ctx,
    )
    try:
        metrics = run_stage(stage, ctx, checkpoint)
    finally:
        logger.finish()
        shutdown()
    if main_process:  # printed last: where the run is, what it did and cost, where to look next
        summary = summarize_run(
            run_dir, stage.name, time.perf_counter() - started, logger.offline_dir, plot=stage.looped
        )
        print("\n" + write_summary(run_dir, summary), flush=True)
    return metrics


def run_stage(stage, ctx: StageContext, checkpoint: Path | None) -> dict[str, float]:
    """One pass of a pass stage, or the training loop of a looped one (resumed from `checkpoint`)."""
    cfg, dist_ctx, logger, run_dir = ctx.cfg, ctx.dist, ctx.logger, ctx.run_dir
    policy, tokenizer, generator = ctx.policy, ctx.tokenizer, ctx.generator
    if not stage.looped:
        return stage.run(ctx)
    built = stage.build(ctx)
    seeded = dist_ctx.strategy != "single" or cfg.trainer.prompt_seeded_sampling
    if dist_ctx.strategy != "single":
        built.sampler = ShardedSampler(built.sampler, dist_ctx.rank, dist_ctx.world_size)
    trainer = Trainer(cfg.trainer, built, logger, run_dir, policy, tokenizer, generator, seeded)
    if checkpoint is not None:
        print(f"resuming from {checkpoint} (step {trainer.resume(checkpoint)})")
    elif cfg.trainer.resume == "auto":
        print(f"trainer.resume=auto: no checkpoint in {run_dir / 'checkpoints'} yet, starting fresh")
    metrics = trainer.fit()
    if built.finish is not None:
        built.finish()
    return metrics


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
    return sweep_objective(get_stage(raw.algo.name).objective, final)  # what a sweeper (Optuna) optimises


def sweep_objective(objective: str | None, final: dict[str, float]) -> float | None:
    """The stage's registered objective as measured on held-out data at the end of the run (`eval/<objective>`,
    e.g. eval/reward/total_mean for the RL algorithms), else as logged by the last step; None when absent."""
    if objective is None:
        return None
    held_out = objective if objective.startswith("eval/") else f"eval/{objective}"
    value = final.get(held_out, final.get(objective))
    return None if value is None else float(value)


def default_algo(overrides: list[str]) -> str | None:
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
    return None  # conf/config.yaml names none: Hydra reports the missing choice


def importable_in_jobs() -> None:
    """A launcher that runs jobs in other processes (hydra/launcher=submitit_local or slurm) unpickles this
    file's task there, which imports the project's packages: the project root goes on their PYTHONPATH."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])


if __name__ == "__main__":
    if {"--help", "-h"} & set(sys.argv[1:]):  # every option of the chosen groups, with its value and help
        from conf.help import main as print_help

        sys.exit(print_help(sys.argv[1:]))
    try:
        check_override_keys(sys.argv[1:], default_algo(sys.argv[1:]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    importable_in_jobs()
    main()
