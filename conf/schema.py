"""Structured configs: the types and valid choices of every option in conf/.

Hydra composes the YAML groups; `validate` merges the result onto these dataclasses so that a
wrong type, an unknown key or a value outside its choices fails before any model is loaded, with a
message that names the valid choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """An invalid configuration value; the message says which key and what is allowed."""


def _divide(total: int, parts: int) -> int:
    """`${div:8,${algo.group_size}}`: an exact integer division for budget-preserving presets."""
    total, parts = int(total), int(parts)
    if parts <= 0 or total % parts:
        raise ConfigError(f"div:{total},{parts}: {total} sequences per step do not split into groups of {parts}; "
                          f"choose a divisor of {total}")
    return total // parts


if not OmegaConf.has_resolver("div"):
    OmegaConf.register_new_resolver("div", _divide)


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            raise ConfigError(f"{key}={value!r} must be at least {low}")
        if low is None:
            raise ConfigError(f"{key}={value!r} must be at most {high}")
        raise ConfigError(f"{key}={value!r} must lie in [{low}, {high}]")


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    source: str = "embedded"  # embedded | hub | local | random
    path: str | None = None  # hub id (source=hub) or directory (source=local)
    revision: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    tokenizer: str | None = None  # where the tokenizer comes from when it differs from `path`
    # only for source=random: the architecture of the freshly initialised Llama
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    init_seed: int = 0
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # a template in models/chat_templates/ (e.g. r1_distill) to use instead of the tokenizer's own
    chat_template: str | None = None

    def __post_init__(self) -> None:
        check_choice("model.source", self.source, ("embedded", "hub", "local", "random"))
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.source in ("hub", "local") and not self.path:
            raise ConfigError(f"model.source={self.source} needs model.path (a hub id or a directory)")


@dataclass
class DataConfig:
    name: str = "medical_o1_verifiable"
    source: str = "auto"  # auto: the hub when reachable, else the shipped sample | hub | local
    hub_id: str | None = None
    hub_config: str | None = None  # the dataset's config name on the hub (e.g. "en")
    hub_split: str = "train"
    local_path: str = "data/medical_o1_demo.jsonl"  # relative to the project root
    kind: str = "open"  # open (free-text answer) | mcq (letter answer) | sft (CoT + response)
    question_field: str = "Open-ended Verifiable Question"
    answer_field: str = "Ground-True Answer"
    reference_field: str | None = "Response"
    cot_field: str | None = "Complex_CoT"
    options_field: str | None = None
    system_prompt: str = ""
    max_prompt_tokens: int = 384  # longer prompts are skipped and counted
    max_rows: int | None = None  # cap on rows read (after the split), for quick runs
    eval_size: int = 16  # held-out rows, chosen by a seeded permutation
    split_seed: int = 1234

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, ("auto", "hub", "local"))
        check_choice("data.kind", self.kind, ("open", "mcq", "sft"))
        check_range("data.eval_size", self.eval_size, 0)
        check_range("data.max_prompt_tokens", self.max_prompt_tokens, 8)


@dataclass
class RewardConfig:
    name: str = "medical"
    # reward name -> weight; the total reward is the weighted sum of the components
    weights: dict[str, float] = field(default_factory=dict)
    # reward name -> keyword arguments passed to that reward function
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the learned reward (weights.reward_model): directory written by algo=reward_model
    path: str | None = None
    batch_size: int = 16  # completions per reward-model forward pass


@dataclass
class GRPOConfig:
    name: str = "grpo"
    prompts_per_step: int = 2  # P prompts, each sampled group_size times
    group_size: int = 4  # G
    num_iterations: int = 1  # mu: optimisation passes over one rollout batch
    minibatch_size: int = 8  # sequences per optimiser step (a multiple of group_size is natural)
    micro_batch_size: int = 8  # sequences per forward/backward; gradients accumulate up to minibatch_size
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04  # KL coefficient; 0 skips the reference model entirely
    kl_estimator: str = "k3"  # k1 | k2 | k3
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo | gspo
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low is DAPO's clip-higher
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    advantage_eps: float = 1e-4
    recompute_old_logp: bool = False  # when false, sampling-time log-probs serve as old log-probs
    fused_loss: bool = True  # policy loss formed inside the lm_head pass (models.fused_loss); not for gspo

    def __post_init__(self) -> None:
        check_choice("algo.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        check_choice("algo.loss_type", self.loss_type, ("grpo", "bnpo", "dr_grpo", "dapo", "gspo"))
        check_choice("algo.scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        check_range("algo.group_size", self.group_size, 1)
        check_range("algo.prompts_per_step", self.prompts_per_step, 1)
        check_range("algo.num_iterations", self.num_iterations, 1)
        check_range("algo.minibatch_size", self.minibatch_size, 1)
        check_range("algo.micro_batch_size", self.micro_batch_size, 1)
        check_range("algo.temperature", self.temperature, 1e-3)
        check_range("algo.top_p", self.top_p, 1e-3, 1.0)
        check_range("algo.beta", self.beta, 0.0)
        check_range("algo.max_new_tokens", self.max_new_tokens, 1)
        for key in ("clip_low", "clip_high", "advantage_eps"):
            check_range(f"algo.{key}", getattr(self, key), 0.0)


@dataclass
class PPOConfig:
    name: str = "ppo"
    prompts_per_step: int = 8  # P prompts per RL step
    samples_per_prompt: int = 1  # completions per prompt; N = P * samples_per_prompt sequences per step
    ppo_epochs: int = 1  # passes over each rollout batch
    minibatch_size: int = 8  # sequences per optimiser step (N / minibatch_size optimiser steps per epoch)
    micro_batch_size: int = 8  # sequences per forward/backward; gradients accumulate up to minibatch_size
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    loss_type: str = "bnpo"  # policy-loss aggregation, as in GRPOConfig (bnpo: mean over all tokens)
    clip_low: float = 0.2
    clip_high: float = 0.2
    vf_coef: float = 0.1  # weight of the value loss
    value_clip: float = 0.2  # new values clipped to old +- value_clip
    ent_coef: float = 0.0  # entropy bonus (0 = none)
    gamma: float = 1.0  # discount per token
    lam: float = 1.0  # GAE lambda
    whiten_advantages: bool = True
    beta: float = 0.02  # initial KL coefficient of the per-token penalty -beta * KL in the reward
    kl_estimator: str = "k1"  # k1 | k2 | k3, the per-token KL in the penalty
    kl_control: str = "fixed"  # fixed | adaptive (Ziegler et al. 2019)
    target_kl: float = 6.0  # adaptive: target KL per sequence (nats)
    kl_horizon: int = 10000  # adaptive: horizon in sequences
    critic: str = "policy"  # critic initialisation: policy (a copy of the policy backbone + a zero head)
    critic_lr: float | None = 2e-4  # null = trainer.lr
    actor_lr: float | None = 1e-4  # null = trainer.lr
    recompute_old_logp: bool = False  # when false, sampling-time log-probs serve as old log-probs
    fused_loss: bool = True  # policy loss formed inside the lm_head pass (models.fused_loss); not for gspo
    default_max_steps: int | None = 24  # trainer.max_steps when not given (conf/trainer/default.yaml)

    def __post_init__(self) -> None:
        check_choice("algo.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        check_choice("algo.loss_type", self.loss_type, ("grpo", "bnpo", "dr_grpo", "dapo", "gspo"))
        check_choice("algo.kl_control", self.kl_control, ("fixed", "adaptive"))
        check_choice("algo.critic", self.critic, ("policy",))
        for key in ("prompts_per_step", "samples_per_prompt", "ppo_epochs", "minibatch_size", "micro_batch_size",
                    "max_new_tokens", "kl_horizon"):
            check_range(f"algo.{key}", getattr(self, key), 1)
        check_range("algo.temperature", self.temperature, 1e-3)
        check_range("algo.top_p", self.top_p, 1e-3, 1.0)
        check_range("algo.gamma", self.gamma, 0.0, 1.0)
        check_range("algo.lam", self.lam, 0.0, 1.0)
        for key in ("beta", "vf_coef", "value_clip", "ent_coef", "target_kl", "clip_low", "clip_high"):
            check_range(f"algo.{key}", getattr(self, key), 0.0)
        for key in ("critic_lr", "actor_lr"):
            if getattr(self, key) is not None:
                check_range(f"algo.{key}", getattr(self, key), 0.0)


@dataclass
class RewardModelConfig:
    name: str = "reward_model"
    # what a preference pair opposes to the row's reference response (always the chosen one):
    # other_response (the reference of another question) | truncated | policy_sample
    rejected: str = "other_response"
    truncate_frac: float = 0.5  # rejected=truncated: share of the reference's words kept
    batch_size: int = 8  # preference pairs per optimiser step
    micro_batch_size: int = 8  # pairs per forward/backward
    max_response_tokens: int = 256  # responses are cut to this many tokens (chosen and rejected alike)
    # rejected=policy_sample: how the policy samples
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        check_choice("algo.rejected", self.rejected, ("other_response", "truncated", "policy_sample"))
        check_range("algo.truncate_frac", self.truncate_frac, 0.0, 1.0)
        for key in ("batch_size", "micro_batch_size", "max_response_tokens", "max_new_tokens"):
            check_range(f"algo.{key}", getattr(self, key), 1)
        check_range("algo.temperature", self.temperature, 1e-3)
        check_range("algo.top_p", self.top_p, 1e-3, 1.0)


LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraOptions:
    """LoRA adapters (peft) on the policy's decoder; the base weights stay frozen and shared."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    # 0 by default: dropout in train mode would make the training log-probs a different function
    # from the sampling-time (eval mode) ones, biasing the PPO ratio
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LORA_TARGETS))

    def __post_init__(self) -> None:
        check_range("trainer.lora.rank", self.rank, 1)
        check_range("trainer.lora.alpha", self.alpha, 0.0)
        check_range("trainer.lora.dropout", self.dropout, 0.0, 1.0)
        if not self.target_modules:
            raise ConfigError("trainer.lora.target_modules is empty; e.g. " + ",".join(LLAMA_LORA_TARGETS))
        if "lm_head" in self.target_modules:
            # the reference reads the same lm_head as the base; adapters live in the decoder only
            raise ConfigError("trainer.lora.target_modules may not include lm_head; choose decoder "
                              "projections such as " + ",".join(LLAMA_LORA_TARGETS))


@dataclass
class SFTConfig:
    name: str = "sft"
    batch_size: int = 8  # rows per optimiser step
    micro_batch_size: int = 8  # rows per forward/backward; gradients accumulate up to batch_size
    max_length: int = 512  # prompt + target tokens; longer rows lose the end of their target (counted)
    # the chain of thought / response are cut to their first N tokens (at a sentence end when one is
    # close) before rendering, so that `</think>` and the answer stay within a short budget; null = whole
    max_cot_tokens: int | None = None
    max_response_tokens: int | None = None
    lr: float | None = None  # null = trainer.lr (SFT usually wants a larger step than RL)

    def __post_init__(self) -> None:
        if self.lr is not None:
            check_range("algo.lr", self.lr, 0.0)
        for key in ("batch_size", "micro_batch_size", "max_length"):
            check_range(f"algo.{key}", getattr(self, key), 1)
        for key in ("max_cot_tokens", "max_response_tokens"):
            if getattr(self, key) is not None:
                check_range(f"algo.{key}", getattr(self, key), 1)


@dataclass
class EvalConfig:
    name: str = "eval"
    max_new_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 1.0
    accuracy_metric: str = "f1"  # f1 | exact | contains: the extracted answer against the ground truth
    before_path: str | None = None  # a model directory (or "embedded") whose answers go beside the model's
    num_answers: int = 3  # held-out questions whose answers are written to answers.md
    # questions (case-insensitive substrings) always written to answers.md when some row contains them
    fixed_questions: list[str] = field(default_factory=lambda: ["61-year-old woman", "cystometry"])

    def __post_init__(self) -> None:
        check_choice("algo.accuracy_metric", self.accuracy_metric, ("f1", "exact", "contains"))
        check_range("algo.max_new_tokens", self.max_new_tokens, 1)
        check_range("algo.temperature", self.temperature, 1e-3)
        check_range("algo.top_p", self.top_p, 1e-3, 1.0)
        check_range("algo.num_answers", self.num_answers, 0)


@dataclass
class RejectionSamplingConfig:
    name: str = "rejection_sampling"
    samples_per_prompt: int = 4  # k completions per prompt
    num_prompts: int | None = None  # training prompts sampled (null = all)
    batch_size: int = 4  # prompts per generation batch
    max_new_tokens: int = 160
    temperature: float = 1.0
    top_p: float = 1.0
    threshold: float = 0.0  # the best sample is kept only if its total reward exceeds this
    # rows of the original data (their reference CoT and response) appended to the output, as R1 mixes
    # non-RL SFT data with the rejection-sampled rows; 0 = none
    source_rows: int = 0
    output: str = "sft_rows.jsonl"  # file name in the run dir

    def __post_init__(self) -> None:
        for key in ("samples_per_prompt", "batch_size", "max_new_tokens"):
            check_range(f"algo.{key}", getattr(self, key), 1)
        if self.num_prompts is not None:
            check_range("algo.num_prompts", self.num_prompts, 1)
        check_range("algo.source_rows", self.source_rows, 0)
        check_range("algo.temperature", self.temperature, 1e-3)
        check_range("algo.top_p", self.top_p, 1e-3, 1.0)


PIPELINE_STAGE_ALGOS = ("sft", "grpo", "ppo", "rejection_sampling", "reward_model")


@dataclass
class StageConfig:
    algo: str = "sft"  # the stage's algorithm (its conf/algo/<name>.yaml)
    overrides: list[str] = field(default_factory=list)  # run.py overrides of this stage (data=..., trainer.max_steps=)
    data_from: str | None = None  # sft: train on the rows an earlier rejection_sampling stage (by name) wrote
    evaluate: bool = True  # run algo=eval on the stage's checkpoint afterwards (model-producing stages)


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    order: list[str] = field(default_factory=list)  # stage names, run in this order
    stages: dict[str, StageConfig] = field(default_factory=dict)
    eval_overrides: list[str] = field(default_factory=list)  # run.py overrides of every eval run
    evaluate_start: bool = True  # evaluate the starting model before the first stage

    def __post_init__(self) -> None:
        if not self.order:
            raise ConfigError("algo.order is empty: list the stage names to run")
        for name in self.order:
            if name not in self.stages:
                raise ConfigError(f"algo.order: stage {name!r} has no entry in algo.stages ({', '.join(self.stages)})")
        for name, stage in self.stages.items():
            check_choice(f"algo.stages.{name}.algo", stage.algo, PIPELINE_STAGE_ALGOS)
            if stage.data_from is not None:
                source = self.stages.get(stage.data_from)
                if source is None or source.algo != "rejection_sampling":
                    raise ConfigError(f"algo.stages.{name}.data_from={stage.data_from!r} must name a "
                                      "rejection_sampling stage")
                runs_after = name in self.order and stage.data_from in self.order and (
                    self.order.index(stage.data_from) < self.order.index(name))
                if name in self.order and not runs_after:
                    raise ConfigError(f"algo.stages.{name}.data_from: stage {stage.data_from!r} must run before it")


@dataclass
class TrainerConfig:
    name: str = "default"
    max_steps: int = 28
    lr: float = 5e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "constant"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    eval_every: int = 0  # 0 = only at the end
    eval_batch_size: int = 8
    log_samples: int = 4  # completions per step written to samples.jsonl
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 3  # step_N checkpoints kept (the newest ones; final is always kept); 0 = all
    save_final: bool = True
    resume: str | None = None  # null (fresh start) | auto (newest checkpoint of the run dir) | a path
    max_consecutive_skips: int = 5  # stop after this many steps in a row with only non-finite updates
    threads: int = 0  # torch CPU threads; 0 = torch's default
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (model.dtype) | fp32 | bf16: the dtype the weights are loaded and run in
    gradient_checkpointing: bool = False  # recompute activations in backward (also on when the model's yaml asks)
    strategy: str = "single"  # single | ddp | fsdp (the last two launched with torchrun; fsdp: full fine-tuning)
    # seed each prompt's samples from (seed, epoch, position in the data order): the samples then do not depend
    # on how prompts are split over ranks or batched (always on for ddp and fsdp)
    prompt_seeded_sampling: bool = False
    lora: LoraOptions = field(default_factory=LoraOptions)

    def __post_init__(self) -> None:
        check_choice("trainer.lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))
        check_choice("trainer.device", self.device, ("auto", "cpu", "cuda"))
        check_choice("trainer.precision", self.precision, ("auto", "fp32", "bf16"))
        check_choice("trainer.strategy", self.strategy, ("single", "ddp", "fsdp"))
        if self.strategy == "fsdp" and self.lora.enabled:
            raise ConfigError("trainer.strategy=fsdp shards full fine-tuning; with trainer.lora.enabled=true choose "
                              "trainer.strategy=ddp (or single): the frozen base is replicated, only adapters train")
        check_range("trainer.max_steps", self.max_steps, 1)
        check_range("trainer.lr", self.lr, 0.0)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"trainer.adam_betas={list(self.adam_betas)} must be two numbers in [0, 1)")
        check_range("trainer.max_grad_norm", self.max_grad_norm, 0.0)
        check_range("trainer.weight_decay", self.weight_decay, 0.0)
        for key in ("warmup_steps", "eval_every", "log_samples", "save_every", "keep_last", "threads"):
            check_range(f"trainer.{key}", getattr(self, key), 0)
        for key in ("eval_batch_size", "max_consecutive_skips"):
            check_range(f"trainer.{key}", getattr(self, key), 1)


@dataclass
class LoggerConfig:
    name: str = "wandb"
    mode: str = "offline"  # offline | online | disabled
    project: str = "ppo-vs-grpo"
    entity: str | None = None
    group: str | None = None  # runs of one experiment are grouped under this name
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("logger.mode", self.mode, ("offline", "online", "disabled"))


ALGO_SCHEMAS: dict[str, type] = {"grpo": GRPOConfig, "ppo": PPOConfig, "reward_model": RewardModelConfig,
                                  "sft": SFTConfig, "eval": EvalConfig, "rejection_sampling": RejectionSamplingConfig,
                                  "pipeline": PipelineConfig}


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    reward: RewardConfig
    algo: Any  # one of ALGO_SCHEMAS, picked by algo.name
    trainer: TrainerConfig
    logger: LoggerConfig
    seed: int = 0
    experiment_name: str = "default"  # groups runs (wandb group, report titles)


GROUP_SCHEMAS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "reward": RewardConfig,
                                  "trainer": TrainerConfig, "logger": LoggerConfig}


def check_override_keys(overrides: list[str], default_algo: str) -> None:
    """Fail on a command-line override of an option that does not exist, naming the valid ones.

    Hydra rejects `trainer.lr_shedule=cosine` itself, but without saying which keys exist; this runs
    first. `+key=value` (adding a key) and group choices (`algo=ppo`) are left to Hydra and `validate`.
    """
    algos = [default_algo]
    for arg in overrides:
        if arg.startswith("algo="):
            algos = arg.split("=", 1)[1].split(",")  # a sweep may list several
    for arg in overrides:
        if arg.startswith(("-", "+", "~", "hydra.")) or "=" not in arg:
            continue
        parts = arg.split("=", 1)[0].split(".")
        if len(parts) < 2:
            continue
        group, name = parts[0], parts[1]
        schemas = [ALGO_SCHEMAS[a] for a in algos if a in ALGO_SCHEMAS] if group == "algo" else \
            [GROUP_SCHEMAS[group]] if group in GROUP_SCHEMAS else []
        for schema in schemas:
            valid = [f.name for f in dataclasses.fields(schema)]
            if name not in valid:
                which = f"algo={schema().name}" if group == "algo" else group
                raise ConfigError(f"{group}.{name} is not an option of {which}; valid keys: {', '.join(valid)}")


def _structured(schema: type, node: Any, key: str) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        if "not in" in msg:  # an unknown key: list the ones that exist
            valid = ", ".join(f.name for f in dataclasses.fields(schema))
            msg = f"{msg}; valid keys: {valid}"
        where = f"{key}.{e.full_key}" if getattr(e, "full_key", None) and "not in" not in msg else key
        raise ConfigError(f"{where}: {msg}") from None
    except TypeError as e:
        raise ConfigError(f"{key}: {e}") from None


def _seed(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"seed={value!r} must be an integer") from None


def validate(cfg: DictConfig) -> Config:
    """Check a composed config against the schemas; returns typed dataclasses or raises ConfigError."""
    known = {"model", "data", "reward", "algo", "trainer", "logger", "seed", "experiment_name"}
    unknown = sorted(set(cfg.keys()) - known - {"hydra"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; valid keys: {sorted(known)}")
    try:  # resolve interpolations across groups (${algo.group_size} in a preset) before splitting the groups
        cfg = OmegaConf.create({key: cfg[key] for key in cfg if key != "hydra"})
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    algo_name = cfg.algo.get("name")
    check_choice("algo", algo_name, tuple(ALGO_SCHEMAS))
    return Config(
        model=_structured(ModelConfig, cfg.model, "model"),
        data=_structured(DataConfig, cfg.data, "data"),
        reward=_structured(RewardConfig, cfg.reward, "reward"),
        algo=_structured(ALGO_SCHEMAS[algo_name], cfg.algo, "algo"),
        trainer=_structured(TrainerConfig, cfg.trainer, "trainer"),
        logger=_structured(LoggerConfig, cfg.logger, "logger"),
        seed=_seed(cfg.get("seed", 0)),
        experiment_name=str(cfg.get("experiment_name", "default")),
    )
