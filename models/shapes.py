"""Model shapes used by name across the project: plain data, importable without torch (experiments/gpu_check.py
reads them before its budget's clock allows torch)."""

# the tests' tiny random Llama (64 wide, 2 layers) with the embedded tokenizer: `ModelConfig(name="tiny_llama",
# **TINY_LLAMA)`; the real code path in seconds, also for the benchmarks' quick modes
TINY_LLAMA = dict(
    source="random",
    tokenizer="embedded",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    init_seed=0,
)


# SmolLM2-135M-Instruct's shapes, for a random Llama of its size where its weights cannot go (an offline GPU
# machine): `ModelConfig(name="smollm2_135m", source="random", tokenizer="embedded", **SMOLLM2_SHAPE)`
SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
)
