"""Structured configs: the types, valid choices and defaults of every option in conf/.

One source of defaults: the dataclasses. Each is stored in Hydra's ConfigStore (`schema/<group>/base`
here, `schema/algo/<name>` by conf.registry for each stage) and every YAML of conf/<group>/ extends
it (`defaults: [/schema/<group>/base@_here_, _self_]`), holding only the values that make that choice
what it is, with a comment on why. So a default lives beside its type, its check and its comment;
the composed config (`python run.py --cfg job`, the run's .hydra/config.yaml, wandb) still shows every
value; and a test that builds a dataclass runs the defaults `python run.py` runs
(tests/conf/test_defaults.py fails on a YAML value that repeats its default, and on a choice that
does not validate). The alternative, YAMLs as the only defaults, would leave the dataclasses unusable
without Hydra and split a default from its type.

Hydra composes the groups; `validate` merges the result onto these dataclasses so that a wrong type,
an unknown key or a value outside its choices fails before any model is loaded, with a message that
names the valid choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conf.checks import ConfigError, check_choice, check_range
from conf.options import option
from conf.registry import UnknownStage, get_stage, stage_names


def _divide(total: int, parts: int) -> int:
    """`${div:8,${algo.group_size}}`: an exact integer division for budget-preserving presets."""
    total, parts = int(total), int(parts)
    if parts <= 0 or total % parts:
        raise ConfigError(
            f"div:{total},{parts}: {total} sequences per step do not split into groups of {parts}; "
            f"choose a divisor of {total}"
        )
    return total // parts


if not OmegaConf.has_resolver("div"):
    OmegaConf.register_new_resolver("div", _divide)


@dataclass
class ModelConfig:
    name: str = option("smollm2_135m", "the choice's name in the model group (conf/model/<name>.yaml)")
    source: str = option(
        "embedded",
        "where the weights come from: embedded (the shipped model) | hub (path: a hub id) | local (path: a "
        "directory) | random (a freshly initialised Llama of the sizes below)",
    )
    path: str | None = option(None, "hub id (source=hub) or model directory (source=local)")
    revision: str | None = option(None, "source=hub: the branch, tag or commit to load (null: the default branch)")
    dtype: str = option(
        "float32",
        "dtype of the weights: float32 | bfloat16 | float16 (also the compute dtype at trainer.precision=auto)",
    )
    tokenizer: str | None = option(
        None,
        "where the tokenizer comes from when it differs from `path`: a hub id, a directory or embedded "
        "(null: the model's own; source=random: the embedded one)",
    )
    hidden_size: int = option(64, "source=random: the Llama's hidden size")
    intermediate_size: int = option(128, "source=random: the Llama's MLP intermediate size")
    num_hidden_layers: int = option(2, "source=random: the Llama's number of decoder layers")
    num_attention_heads: int = option(4, "source=random: the Llama's attention heads")
    num_key_value_heads: int = option(2, "source=random: the Llama's key/value heads (grouped-query attention)")
    max_position_embeddings: int = option(2048, "source=random: the Llama's maximum sequence length, in tokens")
    vocab_size: int | None = option(
        None,
        "source=random: the vocabulary size; null: the tokenizer's (a larger one, e.g. the 8B's 128256, pads "
        "the embedding)",
    )
    tie_word_embeddings: bool = option(
        True, "source=random: lm_head shares the input embedding (the 8B's are separate: false)"
    )
    init_seed: int = option(
        0, "source=random: seed of the weight initialisation (drawn on the model's device: a GPU gives other weights)"
    )
    gradient_checkpointing: bool = option(
        False, "recompute activations in backward (a model that needs it turns it on; also trainer.*)"
    )
    trust_remote_code: bool = option(
        False, "let from_pretrained run code from the model's repository (custom architectures and tokenizers)"
    )
    chat_template: str | None = option(
        None,
        "a template in models/chat_templates/ (e.g. r1_distill) used instead of the tokenizer's own (null: its own)",
    )

    def __post_init__(self) -> None:
        check_choice("model.source", self.source, ("embedded", "hub", "local", "random"))
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.source in ("hub", "local") and not self.path:
            raise ConfigError(f"model.source={self.source} needs model.path (a hub id or a directory)")
        if self.vocab_size is not None:
            check_range("model.vocab_size", self.vocab_size, 1)


@dataclass
class DataConfig:
    name: str = option("medical_o1_verifiable", "the choice's name in the data group (conf/data/<name>.yaml)")
    source: str = option(
        "auto",
        "where the rows come from: auto (the hub when hub_id is set and reachable, else local_path) | hub | local",
    )
    hub_id: str | None = option(None, "the dataset's id on the Hugging Face hub (source=hub or auto)")
    hub_config: str | None = option(None, 'the dataset\'s config name on the hub (e.g. "en"; null: its default)')
    hub_split: str = option("train", "the hub split read; the held-out rows (eval_size) are drawn from it")
    local_path: str = option(
        "data/medical_o1_demo.jsonl", "JSON-lines file read when the source is local (relative to the project root)"
    )
    kind: str = option(
        "open", "what a row asks for: open (free-text answer) | mcq (letter answer) | sft (CoT + response, to imitate)"
    )
    question_field: str = option("Open-ended Verifiable Question", "the row's field holding the question")
    answer_field: str = option(
        "Ground-True Answer", "the row's field holding the ground-truth answer (mcq: the letter; unused for kind=sft)"
    )
    reference_field: str | None = option(
        "Response", "the row's field holding the reference response (kind=sft: the target after the CoT; null: none)"
    )
    cot_field: str | None = option(
        "Complex_CoT", "the row's field holding the reference chain of thought (needed by kind=sft; null: none)"
    )
    options_field: str | None = option(
        None, "kind=mcq: the row's field holding the options (letter -> text, listed under the question)"
    )
    system_prompt: str = option(
        "", "system message of every prompt ('' = none; a template that refuses one gets it atop the user turn)"
    )
    prefill: str = option(
        "",
        "text appended after the chat template's generation prompt, where the model starts writing (e.g. "
        "'<think>\\n' opens the think block for it); not repeated when the template already ends with it; a \\n "
        "or \\t typed on the command line (which Hydra keeps as two characters) is a newline or a tab",
    )
    demonstrations: list[dict[str, str]] = option(
        factory=list,
        help="worked examples shown as earlier turns of the conversation, before the question: a list of "
        "{question: ..., answer: ...}, the answer written as the model should write (e.g. in the think format); "
        "[] = none. In-context, not trained on: a small model copies a format it is shown far more often than one "
        "it is told",
    )
    max_prompt_tokens: int = option(384, "longest prompt, in tokens; longer prompts are skipped and counted")
    max_rows: int | None = option(
        None, "cap on the training rows (after the held-out split), for quick runs; null = all"
    )
    eval_size: int = option(16, "held-out rows, chosen by a seeded permutation (split_seed)")
    split_seed: int = option(1234, "seed of the permutation that splits the held-out rows from the training rows")

    def __post_init__(self) -> None:
        check_choice("data.source", self.source, ("auto", "hub", "local"))
        check_choice("data.kind", self.kind, ("open", "mcq", "sft"))
        check_range("data.eval_size", self.eval_size, 0)
        check_range("data.max_prompt_tokens", self.max_prompt_tokens, 8)
        # `data.prefill="<think>\n"` reaches here as a backslash and an n: a prompt ending in them is never meant
        self.prefill = unescape(self.prefill)
        for i, demo in enumerate(self.demonstrations):
            if set(demo) != {"question", "answer"} or not all(str(v).strip() for v in demo.values()):
                raise ConfigError(
                    f"data.demonstrations[{i}] has {sorted(demo)}: each needs a non-empty question and answer, "
                    "e.g. {question: 'What ...?', answer: '<think> ... </think> ...'}"
                )
        self.demonstrations = [{k: unescape(str(v)) for k, v in demo.items()} for demo in self.demonstrations]


def unescape(text: str) -> str:
    """A \\n or \\t typed on the command line (which Hydra keeps as two characters) as a newline or a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


@dataclass
class RewardConfig:
    name: str = option("medical", "the choice's name in the reward group (conf/reward/<name>.yaml)")
    weights: dict[str, float] = option(
        factory=dict, help="reward name -> weight; the total reward is the weighted sum of the components"
    )
    options: dict[str, dict[str, Any]] = option(
        factory=dict, help="reward name -> keyword arguments passed to that reward function (reward.options.<name>.*)"
    )
    path: str | None = option(
        None,
        "the learned reward (weights.reward_model): the directory algo=reward_model wrote (<run_dir>/reward_model)",
    )
    batch_size: int = option(16, "completions per reward-model forward pass")
    # the call runs in a thread that is abandoned, not killed: Python cannot stop a hung function
    timeout_s: float | None = option(
        None,
        "seconds one reward function may take on one batch (its per-sample retry after a raise included); past "
        "it the batch's samples score 0 for that reward (reward/<name>_timeouts); null = no limit, no thread",
    )

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ConfigError(
                f"reward.timeout_s={self.timeout_s!r} must be a positive number of seconds, or null for no limit"
            )


LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraOptions:
    """LoRA adapters (peft) on the policy's decoder; the base weights stay frozen and shared."""

    enabled: bool = option(False, "train LoRA adapters (peft) on a frozen base instead of every weight")
    rank: int = option(16, "rank r of each adapter's low-rank update")
    alpha: float = option(32.0, "LoRA scaling: the update is multiplied by alpha / rank")
    # 0 by default: dropout in train mode would make the training log-probs a different function
    # from the sampling-time (eval mode) ones, biasing the PPO ratio
    dropout: float = option(0.0, "dropout on the adapters' input, in [0, 1]")
    target_modules: list[str] = option(
        factory=lambda: list(LLAMA_LORA_TARGETS),
        help="decoder projections that get adapters (module names; lm_head is not allowed)",
    )

    def __post_init__(self) -> None:
        check_range("trainer.lora.rank", self.rank, 1)
        check_range("trainer.lora.alpha", self.alpha, 0.0)
        check_range("trainer.lora.dropout", self.dropout, 0.0, 1.0)
        if not self.target_modules:
            raise ConfigError("trainer.lora.target_modules is empty; e.g. " + ",".join(LLAMA_LORA_TARGETS))
        if "lm_head" in self.target_modules:
            # the reference reads the same lm_head as the base; adapters live in the decoder only
            raise ConfigError(
                "trainer.lora.target_modules may not include lm_head; choose decoder "
                "projections such as " + ",".join(LLAMA_LORA_TARGETS)
            )


@dataclass
class TrainerConfig:
    name: str = option("default", "the choice's name in the trainer group (conf/trainer/<name>.yaml)")
    max_steps: int = option(28, "steps (RL: one rollout batch each); an algo may set its own (default_max_steps)")
    lr: float = option(5e-5, "AdamW learning rate (the actor's; an algo may set its own: algo.lr, algo.actor_lr)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas (beta1, beta2), each in [0, 1)")
    lr_schedule: str = option(
        "constant", "learning-rate schedule after warmup: constant | linear | cosine (decay to 0)"
    )
    warmup_steps: int = option(0, "steps of linear learning-rate warmup from 0 (0 = none)")
    max_grad_norm: float = option(
        1.0, "gradient clipping norm; a non-finite loss or norm skips the update (counted, logged)"
    )
    eval_every: int = option(0, "held-out eval every N steps (0 = only at the end)")
    eval_before: bool = option(
        True, "held-out eval before the first step too (always when eval_every > 0): the summary's before -> after"
    )
    eval_batch_size: int = option(8, "prompts per eval generation batch")
    log_samples: int = option(4, "completions per step written to samples.jsonl")
    log_samples_every: int = option(
        10,
        "steps between wandb tables of those samples (prompt, completion, reward parts, advantage, length); the "
        "last step always logs one; 0 = none (samples.jsonl has them either way)",
    )
    save_every: int = option(0, "checkpoint every N steps into checkpoints/step_N (0 = only the final one)")
    keep_last: int = option(3, "step_N checkpoints kept (the newest ones; final is always kept); 0 = all")
    save_final: bool = option(True, "write checkpoints/final (loadable with model.source=local model.path=...)")
    resume: str | None = option(
        None, "null (fresh start) | auto (newest checkpoint of the run dir) | a checkpoint path"
    )
    max_consecutive_skips: int = option(5, "stop after this many steps in a row with only non-finite updates")
    # gradient accumulation keeps the update the same; 3 takes the default micro-batch of 8 down to 1
    max_oom_retries: int = option(
        3,
        "out of memory in an update halves the micro-batch and redoes the minibatch, this many times over the "
        "run; then the run stops with one line (as at micro-batch 1); 0 = stop at once",
    )
    checkpoint_errors: str = option(
        "stop",
        "a checkpoint write that fails (a full disk): stop (one-line error; the last complete checkpoint stays "
        "intact) | warn (a warning, training goes on; counted in checkpoint/failed_saves_total)",
    )
    threads: int = option(0, "torch CPU threads; 0 = torch's default")
    device: str = option("auto", "auto (cuda when available) | cpu | cuda")
    precision: str = option(
        "auto", "the dtype the model computes in: auto (model.dtype) | fp32 | bf16 (trained weights stay fp32)"
    )
    gradient_checkpointing: bool = option(
        False, "recompute activations in backward (also on when the model's yaml asks)"
    )
    strategy: str = option(
        "single", "single | ddp | fsdp (the last two launched with torchrun; fsdp: full fine-tuning)"
    )
    # rank 0 writing a large checkpoint (100 GB for PPO full fine-tuning of 8B, with checksums) keeps the others
    # waiting
    dist_timeout_min: float = option(
        60.0, "minutes a collective may wait under ddp / fsdp before the process group aborts (NCCL's watchdog)"
    )
    prompt_seeded_sampling: bool = option(
        False,
        "seed each prompt's samples from (seed, epoch, position in the data order), so they do not depend on how "
        "prompts are split over ranks or batched (always on for ddp and fsdp)",
    )
    lora: LoraOptions = option(factory=LoraOptions, help="LoRA adapters on the policy (trainer.lora.*)")

    def __post_init__(self) -> None:
        check_choice("trainer.lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))
        check_choice("trainer.device", self.device, ("auto", "cpu", "cuda"))
        check_choice("trainer.precision", self.precision, ("auto", "fp32", "bf16"))
        check_choice("trainer.strategy", self.strategy, ("single", "ddp", "fsdp"))
        check_choice("trainer.checkpoint_errors", self.checkpoint_errors, ("stop", "warn"))
        if self.strategy == "fsdp" and self.lora.enabled:
            raise ConfigError(
                "trainer.strategy=fsdp shards full fine-tuning; with trainer.lora.enabled=true choose "
                "trainer.strategy=ddp (or single): the frozen base is replicated, only adapters train"
            )
        check_range("trainer.max_steps", self.max_steps, 1)
        check_range("trainer.lr", self.lr, 0.0)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"trainer.adam_betas={list(self.adam_betas)} must be two numbers in [0, 1)")
        check_range("trainer.max_grad_norm", self.max_grad_norm, 0.0)
        check_range("trainer.dist_timeout_min", self.dist_timeout_min, 1.0)
        check_range("trainer.weight_decay", self.weight_decay, 0.0)
        for key in (
            "warmup_steps",
            "eval_every",
            "log_samples",
            "log_samples_every",
            "save_every",
            "keep_last",
            "threads",
            "max_oom_retries",
        ):
            check_range(f"trainer.{key}", getattr(self, key), 0)
        for key in ("eval_batch_size", "max_consecutive_skips"):
            check_range(f"trainer.{key}", getattr(self, key), 1)


@dataclass
class LoggerConfig:
    name: str = option("wandb", "the choice's name in the logger group (conf/logger/<name>.yaml)")
    mode: str = option(
        "offline",
        "wandb mode: offline (in the run dir, `wandb sync` later) | online | disabled (no wandb; local files only)",
    )
    project: str = option("ppo-vs-grpo", "wandb project")
    entity: str | None = option(None, "wandb entity (user or team; null: the API key's default)")
    group: str | None = option(None, "wandb group of the run (null: experiment_name)")
    tags: list[str] = option(factory=list, help="wandb tags of the run")
    init_timeout_s: float = option(
        30.0,
        "online: seconds wandb.init may wait for the server (wandb's own is 90); unreachable (or no API key), the "
        "run logs offline in the run dir, with one warning and the `wandb sync` command at the end",
    )

    def __post_init__(self) -> None:
        check_choice("logger.mode", self.mode, ("offline", "online", "disabled"))
        if not self.init_timeout_s > 0:
            raise ConfigError(f"logger.init_timeout_s={self.init_timeout_s!r} must be a positive number of seconds")


@dataclass
class Config:
    model: ModelConfig = option(help="the policy model (model=<choice>: conf/model/)")
    data: DataConfig = option(help="the prompts and answers (data=<choice>: conf/data/)")
    reward: RewardConfig = option(help="the reward functions and their weights (reward=<choice>: conf/reward/)")
    algo: Any = option(
        help="the stage's options (algo=<name>): the registered stage's config dataclass, picked by algo.name"
    )
    trainer: TrainerConfig = option(help="steps, optimiser, evaluation, checkpoints, scale (trainer=<choice>)")
    logger: LoggerConfig = option(help="where metrics go (logger=<choice>: conf/logger/)")
    seed: int = option(0, "the run's random seed (prompt order, sampling, new weights; held-out eval: seed + 10000)")
    experiment_name: str = option("default", "groups runs (wandb group, report titles)")


GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "reward": RewardConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
}


def _max_steps(algo_default: int | None) -> int:
    """`${max_steps:${oc.select:algo.default_max_steps,null}}` (conf/trainer/default.yaml): an algorithm's own
    step budget when it declares one (PPO's steps cost twice GRPO's), else TrainerConfig's default."""
    return int(algo_default) if algo_default is not None else _default(TrainerConfig, "max_steps")


if not OmegaConf.has_resolver("max_steps"):
    OmegaConf.register_new_resolver("max_steps", _max_steps)
for _group, _schema in GROUP_SCHEMAS.items():  # conf/<group>/*.yaml extend these: one source of defaults
    ConfigStore.instance().store(group=f"schema/{_group}", name="base", node=_schema)


def algo_schema(name: str) -> type:
    """The config dataclass of stage `name`; ConfigError naming the registered stages for an unknown one."""
    try:
        return get_stage(name).config
    except UnknownStage as err:
        raise ConfigError(str(err)) from None


def check_override_keys(overrides: list[str], default_algo: str | None) -> None:
    """Fail on a command-line override of an option that does not exist, naming the valid ones.

    Hydra rejects `trainer.lr_shedule=cosine` or `trainer.max_steps=ten` itself, but in several lines and
    without saying which keys exist; this runs first, and also checks each value's type against the
    schema. `+key=value` (adding a key) and group choices (`algo=ppo`) are left to Hydra and `validate`.
    """
    check_group_choices(overrides)
    algos = [default_algo] if default_algo is not None else []
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
        if group == "algo":
            schemas = [get_stage(a).config for a in algos if a in stage_names()]
        else:
            schemas = [GROUP_SCHEMAS[group]] if group in GROUP_SCHEMAS else []
        for schema in schemas:
            valid = [f.name for f in dataclasses.fields(schema)]
            if name not in valid:
                which = f"algo={_default(schema, 'name')}" if group == "algo" else group
                raise ConfigError(f"{group}.{name} is not an option of {which}; valid keys: {', '.join(valid)}")
            _check_type(schema, arg)


CONF_DIR = Path(__file__).resolve().parent


def group_choices(group: str) -> list[str]:
    """The choices of a config group: the YAMLs of conf/<group>/ (e.g. `algo`, `hydra/launcher`)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_choices(overrides: list[str]) -> None:
    """Fail on `algo=grp`, `model=nope`, `experiment=nope` (each value of a sweep too) with one line naming the
    choices of that group, before Hydra's multi-line MissingConfigException."""
    for arg in overrides:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or "." in key or key.startswith(("-", "~", "hydra")) or not (CONF_DIR / key).is_dir():
            continue
        valid = group_choices(key)
        for one in _sweep_values(value):
            if one not in valid and one != "null" and "(" not in one and "${" not in one:
                raise ConfigError(f"{key}={one} is not a choice of {key}; choose one of: {', '.join(valid)}")


def _sweep_values(value: str) -> list[str]:
    """The values of a command-line override: `a,b` in a sweep is two (commas inside brackets are not split)."""
    out, depth, current = [], 0, ""
    for char in value:
        depth += (char in "[{" and 1) or ((char in "]}" and -1) or 0)
        if char == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += char
    return [*out, current]


def _check_type(schema: type, arg: str) -> None:
    """ConfigError when an override's value cannot have its option's type (`trainer.max_steps=ten`)."""
    key, value = arg.split("=", 1)
    if "${" in value or "(" in value:  # interpolations and sweep functions: Hydra's to resolve
        return
    path = key.split(".", 1)[1]
    node = OmegaConf.structured(schema)
    parent = path.rsplit(".", 1)[0] if "." in path else None
    if parent is not None and OmegaConf.select(node, parent, default=None) is None:
        return  # inside a dict with no default entry (the pipeline's stages.<name>): validate checks it whole
    for one in _sweep_values(value):
        try:
            OmegaConf.update(node.copy(), path, yaml.safe_load(one) if one else one, merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}={one!r}: {str(e).splitlines()[0]}") from None
        except yaml.YAMLError:
            return  # not YAML: left to Hydra's own parser


def _default(schema: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(schema) if f.name == name)


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
    unknown = sorted(set(map(str, cfg.keys())) - known - {"hydra"})  # a composed config's keys are all str
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; valid keys: {sorted(known)}")
    try:  # resolve interpolations across groups (${algo.group_size} in a preset) before splitting the groups
        # plain containers: the composed groups are typed by their schemas, which would let a `+key` added by
        # an override through; merged onto the schemas below, an unknown key is an error naming the valid ones
        cfg = OmegaConf.create(
            {
                key: OmegaConf.to_container(cfg[key], resolve=False) if OmegaConf.is_config(cfg[key]) else cfg[key]
                for key in cfg
                if key != "hydra"
            }
        )
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    algo_name = cfg.algo.get("name")
    schema = algo_schema(algo_name)
    return Config(
        model=_structured(ModelConfig, cfg.model, "model"),
        data=_structured(DataConfig, cfg.data, "data"),
        reward=_structured(RewardConfig, cfg.reward, "reward"),
        algo=_structured(schema, cfg.algo, "algo"),
        trainer=_structured(TrainerConfig, cfg.trainer, "trainer"),
        logger=_structured(LoggerConfig, cfg.logger, "logger"),
        seed=_seed(cfg.get("seed", 0)),
        experiment_name=str(cfg.get("experiment_name", "default")),
    )


def compose_config(overrides: list[str] | tuple = ()) -> Config:
    """The validated Config that `python run.py [overrides]` runs with (for tests and tools)."""
    from hydra import compose, initialize_config_dir  # here: composing is what tools do, not what runs import

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose(config_name="config", overrides=list(overrides)))


def load_choice(group: str, choice: str, overrides: list[str] | tuple = ()) -> Any:
    """One group's dataclass as `python run.py <group>=<choice> [overrides]` composes it (for tests and tools)."""
    return getattr(compose_config([f"{group}={choice}", *overrides]), group)
