r"""Projected GPU memory of an RL run (GRPO, PPO, ...), per model: weights, gradients, optimiser state, activations.

    python -m models.memory model=r1_distill_llama_8b trainer=h100
    python -m models.memory model=r1_distill_llama_8b trainer=h100 trainer.lora.enabled=false
    python -m models.memory model=r1_distill_llama_8b trainer=h100 trainer.lora.enabled=false \
        trainer.strategy=fsdp --gpus 8

Takes the same overrides as run.py and prints one table per RL algorithm of the stage registry, counting
the models each keeps besides the actor (conf.registry: a reference, a critic). The counts
are exact for weights, gradients and AdamW state (tests compare them with the bytes of real tensors
on the tiny model); activations are given per token of a training micro-batch:
- with activation checkpointing (what the large configs use), each decoder layer keeps its input
  (H values per token) and one layer at a time is recomputed in backward;
- without it, a Llama layer keeps about 10 H + 2 KV + 4 I values per token (norm inputs in fp32,
  q, k, v, attention output, MLP gate, up and product; memory-efficient attention, no T^2 term);
- the final norm keeps its input and output (2 H values per token, + an fp32 copy in bf16); every completion
  token also keeps its token id and fp32 log-sum-exp statistics for the fused lm_head + log-prob backward
  (never a [V] logits row: the backward recomputes it chunk by chunk).
The KV cache of generation is reported per sampled sequence token, and for the chosen algorithm's rollout
(algo.rollout.max_batch sequences at once, each up to data.max_prompt_tokens + algo.max_new_tokens). Peak
memory of a step is roughly weights + gradients + optimiser + max(training activations, KV cache) + allocator slack.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from conf.schema import Config, ModelConfig
from models.decode import StaticDecoder

# Architectures of hub models, so the projection needs neither the hub nor the weights.
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {  # hub id -> Architecture's fields
    # Llama-3.1-8B's shape (config.json of deepseek-ai/DeepSeek-R1-Distill-Llama-8B)
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
EXTRA_MODELS = ("reference", "critic")  # the models besides the actor that `project` counts
GiB = 1024**3


@dataclass(frozen=True)
class Architecture:
    """A Llama-style decoder: the shapes that decide its memory."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one decoder layer."""
        H, I, q, kv = self.hidden_size, self.intermediate_size, self.num_attention_heads * self.head_dim, self.kv_size
        return {
            "q_proj": (H, q),
            "k_proj": (H, kv),
            "v_proj": (H, kv),
            "o_proj": (q, H),
            "gate_proj": (H, I),
            "up_proj": (H, I),
            "down_proj": (I, H),
        }

    def num_params(self, lm_head: bool = True) -> int:
        """Parameters of the causal LM (lm_head=False: the decoder alone, a critic's backbone)."""
        H, V = self.hidden_size, self.vocab_size
        layer = sum(i * o for i, o in self.linears().values()) + 2 * H  # + two RMSNorm weights
        head = V * H if lm_head and not self.tie_word_embeddings else 0
        return V * H + self.num_hidden_layers * layer + H + head

    def lora_params(self, rank: int, targets: list[str]) -> int:
        shapes = self.linears()
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise ValueError(
                f"LoRA targets {unknown} are not projections of a Llama layer; choose from {sorted(shapes)}"
            )
        return self.num_hidden_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)

    def activation_bytes_per_token(self, dtype_bytes: int, checkpointing: bool) -> float:
        """Bytes kept for backward per token of a training forward, decoder only (see module doc)."""
        H, I, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        # the final norm: its input and output (the rows lm_head reads), + the fp32 upcast of a low-precision input
        final_norm = 2 * H * dtype_bytes + (4 * H if dtype_bytes < 4 else 0)
        if checkpointing:
            return L * H * dtype_bytes + final_norm
        per_layer = 2 * H * 4 + (8 * H + 2 * self.kv_size + 4 * I) * dtype_bytes
        return L * per_layer + final_norm

    def logits_bytes_per_token(self) -> float:
        # models.logprobs.fused_token_logprobs saves a view of the final hidden rows (counted with the
        # final norm), the token id (int64), and fp32 log-sum-exp and E[z]: no [V] logits row
        return 8.0 + 2 * 4.0

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> float:
        return 2.0 * self.num_hidden_layers * self.kv_size * dtype_bytes


def architecture(cfg: ModelConfig, vocab_size: int | None = None) -> Architecture:
    """The shape of the model `cfg` loads: from the config (random), the known table, or config.json."""
    if cfg.source == "random":
        vocab_size = cfg.vocab_size or vocab_size
        if vocab_size is None:
            from models.loading import load_tokenizer

            vocab_size = len(load_tokenizer(cfg))
        return Architecture(
            vocab_size,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.tie_word_embeddings,
        )
    if cfg.source == "hub" and cfg.path in KNOWN_ARCHITECTURES:
        return Architecture(**KNOWN_ARCHITECTURES[cfg.path])
    from transformers import AutoConfig

    from models.loading import _pretrained_source

    name, kwargs = _pretrained_source(cfg)
    hf = AutoConfig.from_pretrained(name, **kwargs)
    return Architecture(
        hf.vocab_size,
        hf.hidden_size,
        hf.intermediate_size,
        hf.num_hidden_layers,
        hf.num_attention_heads,
        getattr(hf, "num_key_value_heads", hf.num_attention_heads),
        bool(getattr(hf, "tie_word_embeddings", False)),
    )


@dataclass
class ModelMemory:
    """Bytes of one model of an RL run (0 where a model has none of that kind)."""

    name: str
    params: int
    weights: float
    grads: float = 0.0
    optimizer: float = 0.0

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer


def project(
    arch: Architecture,
    dtype_bytes: int,
    lora_rank: int | None = None,
    lora_targets: list[str] | None = None,
    *,
    reference: bool,
    critic: bool,
) -> list[ModelMemory]:
    """Weights, gradients and AdamW state of each model of an RL run, as this project builds them: the
    actor, plus a frozen reference and a trained critic when the algorithm keeps them.

    Full fine-tuning: the actor, the reference (a frozen copy) and the critic (a copy of the decoder
    plus an fp32 head) each hold their weights in `dtype_bytes` (4: fp32 master weights, also when the
    model computes in bf16, models.scale); trained weights have gradients and two AdamW moments in the
    same dtype. LoRA (lora_rank set): one base in `dtype_bytes` (the compute dtype) serves all three;
    each adapter and the head are fp32 with fp32 gradients and moments.
    """
    P, H = arch.num_params(), arch.hidden_size
    head = H + 1  # the critic's value head, fp32
    models = []
    if lora_rank is None:
        models.append(ModelMemory("actor", P, P * dtype_bytes, P * dtype_bytes, 2 * P * dtype_bytes))
        if reference:
            models.append(ModelMemory("reference", P, P * dtype_bytes))
        if critic:
            C = arch.num_params(lm_head=False)
            models.append(
                ModelMemory(
                    "critic",
                    C + head,
                    C * dtype_bytes + 4 * head,
                    C * dtype_bytes + 4 * head,
                    2 * (C * dtype_bytes + 4 * head),
                )
            )
        return models
    A = arch.lora_params(lora_rank, lora_targets or [])
    models.append(ModelMemory("base (shared)", P, P * dtype_bytes))
    models.append(ModelMemory("actor adapter", A, 4 * A, 4 * A, 8 * A))
    if reference:
        models.append(ModelMemory("reference (adapters off)", 0, 0.0))
    if critic:
        models.append(ModelMemory("critic adapter + head", A + head, 4 * (A + head), 4 * (A + head), 8 * (A + head)))
    return models


def fsdp_per_gpu(models: list[ModelMemory], arch: Architecture, dtype_bytes: int, gpus: int) -> tuple[float, float]:
    """(sharded static bytes per GPU, transient gathered bytes) under trainer.strategy=fsdp on `gpus` GPUs;
    dtype_bytes: the compute dtype's, which FSDP gathers the weights in.

    Every model's weights, gradients and AdamW state are split evenly over the GPUs; on top of its
    shard a GPU holds the actor's full weights while sampling (generation runs on gathered weights,
    parallel.fsdp), which is larger than the one or two layers gathered at a time in training.
    """
    return sum(m.static for m in models) / gpus, arch.num_params() * dtype_bytes


def report(cfg: Config, arch: Architecture, algos: dict[str, tuple[str, ...]], gpus: int = 1) -> str:
    """The markdown tables `python -m models.memory` prints: one per algorithm of `algos`, which maps a
    name to the models it keeps besides the actor (conf.registry.Stage.models: reference, critic).
    `gpus`: the world size under fsdp."""
    for algo, kept in algos.items():
        uncounted = sorted(set(kept) - set(EXTRA_MODELS))
        if uncounted:
            raise ValueError(f"{algo} keeps {uncounted}: the projection counts only {', '.join(EXTRA_MODELS)}")
    from models.scale import compute_dtype, model_config_for

    model_cfg = model_config_for(cfg.model, cfg.trainer)  # the dtype the weights are held in
    b = DTYPE_BYTES[model_cfg.dtype]
    compute = compute_dtype(cfg.model, cfg.trainer)
    cb = DTYPE_BYTES[compute]  # activations, KV cache and gathered weights
    ckpt = cfg.model.gradient_checkpointing or cfg.trainer.gradient_checkpointing
    lora = cfg.trainer.lora
    act = arch.activation_bytes_per_token(cb, ckpt)
    logits = arch.logits_bytes_per_token()
    kv = arch.kv_cache_bytes_per_token(cb)
    dtype = compute if compute == model_cfg.dtype else f"{compute} compute on {model_cfg.dtype} master weights"
    lines = [
        f"# Projected GPU memory: {cfg.model.name} ({arch.num_params() / 1e9:.2f} B params), {dtype}, "
        f"{'LoRA r=' + str(lora.rank) if lora.enabled else 'full fine-tuning'}, "
        f"activation checkpointing {'on' if ckpt else 'off'}",
        "",
    ]
    for algo, kept in algos.items():
        critic = "critic" in kept
        models = project(
            arch,
            b,
            lora.rank if lora.enabled else None,
            list(lora.target_modules),
            reference="reference" in kept,
            critic=critic,
        )
        lines += [
            f"## {algo.upper()}",
            "",
            "| model | params | weights GiB | grads GiB | AdamW GiB | total GiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for m in models:
            lines.append(
                f"| {m.name} | {m.params / 1e6:,.1f} M | {m.weights / GiB:.2f} | {m.grads / GiB:.2f} | "
                f"{m.optimizer / GiB:.2f} | {m.static / GiB:.2f} |"
            )
        total = sum(m.static for m in models)
        trained = 2 if critic else 1  # a critic runs its own decoder pass with activations
        lines += [f"| **all** | | | | | **{total / GiB:.2f}** |", ""]
        if cfg.trainer.strategy == "fsdp":
            shard, gathered = fsdp_per_gpu(models, arch, cb, gpus)
            lines += [
                (
                    f"fsdp over {gpus} GPUs: {shard / GiB:.2f} GiB of sharded weights, gradients and AdamW "
                    f"state per GPU, + {gathered / GiB:.2f} GiB of gathered actor weights while sampling"
                ),
                "",
            ]
        lines += [
            (
                f"activations per training token: {trained} x {act / 2**20:.3f} MiB (decoder) "
                f"+ {logits:.0f} bytes per completion token (fused lm_head state); "
                f"KV cache per sampled token: {kv / 2**20:.3f} MiB"
            ),
            "",
        ]
    rollout = getattr(cfg.algo, "rollout", None)
    if rollout is not None:  # the chosen RL algorithm's sampling batch
        lines += [rollout_kv_line(cfg, kv), ""]
    return "\n".join(lines)


def rollout_kv_line(cfg: Config, kv_bytes_per_token: float) -> str:
    """The static KV cache the rollout allocates: sequences decoded at once x (longest prompt + completion)."""
    algo = cfg.algo
    sequences = algo.prompts_per_step * algo.group_size
    batch = min(sequences, algo.rollout.max_batch) if algo.rollout.max_batch > 0 else sequences
    length = cfg.data.max_prompt_tokens + algo.max_new_tokens
    step = StaticDecoder.LENGTH_STEP
    compiled = -(-length // step) * step
    total = batch * compiled * kv_bytes_per_token
    chunks = -(-sequences // batch)
    return (
        f"KV cache of the rollout ({algo.name}): {batch} sequences decoded at once x {length} tokens "
        f"(data.max_prompt_tokens {cfg.data.max_prompt_tokens} + algo.max_new_tokens {algo.max_new_tokens}; "
        f"{compiled} when the step is compiled, rounded up to {step}) = {total / GiB:.2f} GiB at most, held "
        f"through training when compiled (kept between rollouts: algo.rollout.compile, auto = on a GPU); "
        f"{sequences} sequences per step in {chunks} chunk(s) (algo.rollout.max_batch={algo.rollout.max_batch})"
    )


def main(argv: list[str]) -> None:
    from conf.registry import discover, get_stage, stage_names
    from conf.schema import compose_config

    gpus = 1
    if "--gpus" in argv:  # the world size of an fsdp run: the rest are run.py's overrides
        at = argv.index("--gpus")
        gpus, argv = int(argv[at + 1]), argv[:at] + argv[at + 2 :]
    discover()  # the stages register their config schemas, which conf/algo/*.yaml extend, and their models
    cfg = compose_config(argv)
    # the chosen algorithm's models under its options (PPO with a group baseline keeps no critic), the others'
    # at their defaults
    algos = {
        name: get_stage(name).kept_models(cfg.algo if name == cfg.algo.name else None)
        for name in stage_names(kind="rl")
    }
    print(report(cfg, architecture(cfg.model), algos, gpus))


if __name__ == "__main__":
    main(sys.argv[1:])
