"""The GPU check: one prepared command that exercises the GPU path on one GPU, offline, in a time budget.

    python experiments/gpu_check.py --out DIR            # one CUDA GPU; nothing is downloaded; --budget-s 480
    python experiments/gpu_check.py --tiny --out DIR     # the same checks on the CPU at tiny shapes (a test runs it)
    make gpu-check OUT=DIR

The sections run in order of value, each only if its estimated cost (COST_S: seconds on one H100, TINY_COST_S
on 2 CPU cores) fits what is left of `--budget-s` (default 480: one command of at most 10 minutes, with room
for the machine's start and the copy back); one that does not fit is skipped with a line saying so. After
every section DIR/gpu_check.md and DIR/gpu_check.json are rewritten (a temp file, then os.replace), with each
section's wall time and the section in progress marked `running`, so a run killed at its limit still returns
what it measured. A run.py or child process never runs past the budget's end (its timeout is what is left).
0. `environment`: GPU, driver, CUDA, NCCL, torch, triton, transformers, peft;
1. `kernels`: the Triton log-prob and fused-loss kernels, compiled, against the PyTorch reference in fp32 and
   bf16 (values and gradients) at the 8B model's shapes (H 4096, V 128256) and the embedded model's; the
   fused backward's fp32 `grad_weight.addmm_` against a bf16 matmul; `bench_logprobs.py --device cuda` rows;
2. `rollout`: the 8B-shaped decode, experiments/bench_rollout.py on the 8B shape (random weights, bf16) at
   batch 64 (16 prompts x G=4, 64 new tokens), in a child process (its CUDA graphs and compiled code go with
   it): the dynamic-cache, static-cache and compiled (CUDA graph) samplers against model.generate; every
   sampler is run once cold (for the compiled one: torch.compile and CUDA-graph capture) and then timed warm,
   so the compile/capture seconds are reported apart from the steady-state tokens/s and share of peak HBM
   bandwidth; each sampler's recorded log-probs must match a teacher-forced forward's (mean gap <=
   ROLLOUT_LOGP_GAP), and in fp32 (`--tiny`) the samplers must draw the same tokens (in bf16 the share of
   equal tokens is reported: kernels that round differently flip near-ties);
3. `8b`: a Llama with DeepSeek-R1-Distill-Llama-8B's shapes and random weights made on the GPU, under
   trainer=h100 (LoRA, bf16, checkpointing): GRPO and PPO, each a warm-up step (the decode step's compile and
   CUDA-graph capture happen there) and then the timed step (P=8, G=8, 512 new tokens): s/step by phase,
   generated tokens/s and decode bandwidth fraction of the warm step, the warm-up's extra generate seconds,
   peak CUDA memory against models.memory's projection;
4. `embedded`: 3 GRPO and 3 PPO steps of SmolLM2-135M in bf16 (full fine-tuning) through run.py: s/step by
   phase, peak CUDA memory, and a resume from the step-2 checkpoint against the uninterrupted step 3;
5. `fsdp`: trainer.strategy=fsdp (bf16 full fine-tuning) under `torchrun --nproc_per_node=1` on NCCL for
   2 steps, and a resume from its step-1 checkpoint;
6. `probe`: a left-padded batch through the embedded model in bf16 (SDPA): finite logits and log-probs, and how
   far the sampling-time log-probs are from the training pass's (why bf16 recomputes the old log-probs).
Each section records its own failure (with the traceback's tail) and the others still run; the exit code
is 1 when any section failed (a skipped one is not a failure). `--tiny` runs every section on the CPU (Triton
under its interpreter, gloo, model=tiny_llama, a few tokens), so that the script cannot rot while no GPU is at
hand, and prints each section's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

STARTED = time.perf_counter()  # the budget counts from here, the imports (torch's) included
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.shapes import SMOLLM2_SHAPE  # noqa: E402  (plain data: no torch before the clock starts)

# SmolLM2-135M-Instruct's shapes with random weights and its real tokenizer: what the GPU machine can run, where
# the model's weights cannot travel (experiments/gpu_pack.py carries the tokenizer and config only)
SMOLLM2_RANDOM = (
    "model=smollm2_135m",
    "model.source=random",
    "model.tokenizer=embedded",
    *(f"model.{key}={value}" for key, value in SMOLLM2_SHAPE.items()),
)


@dataclass(frozen=True)
class Sizes:
    """What each section runs at: a GPU's (the real shapes) or the CPU's (--tiny)."""

    device: str  # cuda | cpu
    kernel_shapes: tuple[tuple[str, int, int], ...]  # (name, H, V)
    kernel_rows: int
    bench: tuple[str, ...]  # bench_logprobs.py arguments
    embedded: tuple[str, ...]  # run.py overrides of the embedded-model runs
    embedded_steps: int
    big: dict  # model.* of the 8B-shaped random Llama
    big_run: tuple[str, ...]  # run.py overrides of the 8B runs
    fsdp_steps: int
    timeout_s: int  # per run.py process
    rollout: tuple[str, ...]  # bench_rollout.py arguments


GPU = Sizes(
    device="cuda",
    kernel_shapes=(("8B", 4096, 128256), ("SmolLM2-135M", 576, 49152)),
    kernel_rows=512,
    bench=(
        "--device",
        "cuda",
        "--dtype",
        "bfloat16",
        "--batch",
        "8",
        "--seq",
        "256",
        "--vocab",
        "128256",
        "--hidden",
        "4096",
        "--repeats",
        "3",
        "--warmup",
        "1",
    ),  # every method (trl's when installed)
    embedded=(*SMOLLM2_RANDOM, "data.eval_size=4", "trainer.eval_batch_size=4"),
    embedded_steps=3,
    big={
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
    big_run=(
        "algo.prompts_per_step=8",
        "algo.group_size=8",
        "algo.max_new_tokens=512",
        "algo.minibatch_size=64",
        "algo.micro_batch_size=8",
    ),
    fsdp_steps=2,
    timeout_s=300,
    # decode of the 8B shape at batch 64: our samplers (CUDA graphs included) against model.generate
    rollout=(
        "--device",
        "cuda",
        "--shape",
        "8b",
        "--prompts",
        "16",
        "--group-size",
        "4",
        "--max-new-tokens",
        "64",
        "--repeats",
        "2",
    ),
)
TINY = Sizes(
    device="cpu",
    kernel_shapes=(("8B-like", 48, 1000), ("SmolLM2-like", 32, 500)),
    kernel_rows=8,
    bench=(
        "--device",
        "cpu",
        "--batch",
        "2",
        "--seq",
        "8",
        "--vocab",
        "500",
        "--hidden",
        "32",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--methods",
        "naive",
        "fused_loss",
    ),
    embedded=(
        "model=tiny_llama",
        "data.eval_size=0",
        "algo.max_new_tokens=4",
        "algo.prompts_per_step=2",
        "algo.group_size=2",
        "algo.minibatch_size=4",
        "algo.micro_batch_size=2",
        "trainer.device=cpu",
        "trainer.threads=1",
    ),
    embedded_steps=2,
    big={
        "vocab_size": 50000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    },
    big_run=(
        "algo.prompts_per_step=2",
        "algo.group_size=2",
        "algo.max_new_tokens=4",
        "algo.minibatch_size=4",
        "algo.micro_batch_size=2",
        "trainer.device=cpu",
        "trainer.threads=1",
    ),
    fsdp_steps=2,
    timeout_s=300,
    rollout=(
        "--device",
        "cpu",
        "--shape",
        "tiny",
        "--prompts",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "4",
        "--repeats",
        "1",
        "--no-compile",
    ),
)
# every run.py process: offline, no wandb, the shipped data, no periodic eval
COMMON = ("logger.mode=disabled", "data.source=local", "trainer.eval_every=0", "trainer.log_samples=0")

BUDGET_S = 480  # default --budget-s: the device allows one command of <= 10 minutes; this leaves room to spare
# Estimated seconds of each section on one H100, in the order they run (the order of value): a section starts
# only when its estimate fits what is left of the budget. No GPU run has measured them yet: estimates from the
# shapes (8B bf16 weights 16 GB, ~3.3 TB/s, ~400 TFLOP/s) and the process starts; revise them from a report's
# seconds. At the default budget the first four fit (env + kernels + rollout + 8b = 435 s); the rest (embedded,
# fsdp, packing, probe) run with a larger --budget-s.
COST_S = {
    "environment": 5,  # version queries and one nvidia-smi
    "kernels": 60,  # Triton compiles (3 paths x 2 backends x 2 dtypes x 2 shapes) + a bench_logprobs.py process
    "rollout": 130,  # child process, 8B random init ~25 s, 3 samplers x 3 decodes of 64 steps, compile+capture ~60 s
    "8b": 240,  # 2 run.py processes (start + 8B init ~35 s; cold step ~60 s compile/capture + ~20 s; warm ~20 s)
    "embedded": 120,  # 4 run.py processes (3 steps or 1 resumed step of SmolLM2-135M), ~30 s each
    "fsdp": 60,  # 2 torchrun processes (2 steps, then 1 resumed) of SmolLM2-135M on NCCL
    "packing": 40,  # bench_train.py: SmolLM2-135M, 16 sequences of up to ~450 tokens, 2 modes x 4 runs
    "probe": 20,  # SmolLM2-135M loaded in-process, one padded forward, a 32-token rollout
}
# The same on 2 CPU cores at --tiny's shapes (measured there, other work sharing the cores: ~260 s in all; the
# run.py and child processes' starts, each importing torch and transformers, dominate)
TINY_COST_S = {
    "environment": 1,
    "kernels": 30,  # Triton under its interpreter + a bench_logprobs.py process (20-55 s measured)
    "rollout": 20,  # a child process and tiny decodes (24 s measured)
    "8b": 45,  # 2 run.py processes of 2 steps (38 s measured)
    "embedded": 90,  # 4 run.py processes (76-91 s measured)
    "fsdp": 60,  # 2 torchrun processes (46-75 s measured)
    "packing": 20,  # bench_train.py --quick in its own process
    "probe": 20,  # (15-30 s measured)
}
ISOLATED = {"rollout"}  # sections run in a child process: the 8B weights, compiled code and CUDA graphs leave with it
BUDGET = {"deadline": None}  # time.perf_counter() at which the budget ends (set by main)


def seconds_left(cap: float) -> float:
    """A child process's timeout: `cap`, or what is left of the budget when that is less (at least 1 s)."""
    if BUDGET["deadline"] is None:
        return cap
    return max(1.0, min(cap, BUDGET["deadline"] - time.perf_counter()))


class CheckFailed(AssertionError):
    """A section ran but a check did not hold (as opposed to an error)."""


# ---------------------------------------------------------------- environment and run.py


def environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    }
    for package in ("triton", "transformers", "peft"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            gpus_visible=torch.cuda.device_count(),
        )
        try:
            nccl = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception:  # a build without NCCL
            env["nccl"] = None
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, IndexError, subprocess.TimeoutExpired):
            env["driver"] = None
    else:
        env.update(gpu=None, cpu=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    return env


def bounded(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own, the whole process group killed at the timeout (torchrun's workers
    too, so that none keeps the GPU after the budget's end); TimeoutExpired then, as subprocess.run raises."""
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with subprocess.Popen(cmd, start_new_session=True, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_py(args: list[str], run_dir: Path, sizes: Sizes, torchrun: bool = False) -> list[dict]:
    """`python run.py ARGS` (or under `torchrun --nproc_per_node=1`) into run_dir; the logged step metrics."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
    }
    if sizes.device == "cpu":
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        if torchrun
        else [sys.executable]
    )
    cmd = [*launcher, str(ROOT / "run.py"), *COMMON, *args, f"hydra.run.dir={run_dir}"]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = bounded(cmd, seconds_left(sizes.timeout_s), cwd=run_dir.parent, env=env, capture_output=True, text=True)
    (run_dir.parent / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(
            f"run.py exited with {proc.returncode}: {' '.join(cmd[len(launcher) :])}\n{proc.stderr[-2500:]}"
        )
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "time/step" in m]


def resumed_runs(name: str, args: list[str], out: Path, steps: int, sizes: Sizes, torchrun: bool = False) -> dict:
    """`steps` steps with a checkpoint at step `steps - 1`, then the last step again from that checkpoint."""
    from experiments.gpu_measure import compare_resume, phase_seconds

    full, resumed = out / f"{name}_full", out / f"{name}_resumed"
    metrics = run_py(
        [*args, f"trainer.max_steps={steps}", f"trainer.save_every={steps - 1}", "trainer.keep_last=0"],
        full,
        sizes,
        torchrun,
    )
    prev = full / "checkpoints" / f"step_{steps - 1}"
    run_py([*args, f"trainer.max_steps={steps}", f"trainer.resume={prev}"], resumed, sizes, torchrun)
    step_1 = metrics[0]
    return {
        "phases_s": phase_seconds(metrics),
        "peak_cuda_mb": max((m.get("memory/peak_cuda_mb", 0.0) for m in metrics), default=0.0),
        "tokens_generated_per_step": [m["tokens/generated"] for m in metrics],
        "step1_approx_kl": step_1.get("approx_kl"),
        "step1_clip_frac": step_1.get("clip_frac"),
        "resume": compare_resume(full, resumed, prev, sizes.device),
    }


# ---------------------------------------------------------------- sections


def section_probe(sizes: Sizes, out: Path) -> dict:
    """Left-padded prompts through SDPA in bf16: finite logits at real positions and finite log-probs; and the
    gap between sampling-time and training-pass log-probs (the ratio's start) in bf16."""
    import torch

    from algorithms.rollout import generate_rollout
    from conf.schema import ModelConfig
    from models.forward import position_ids
    from models.loading import load_causal_lm, load_tokenizer
    from models.logprobs import completion_logprobs

    device = torch.device(sizes.device)
    if sizes.device == "cuda":  # SmolLM2-135M's shapes and tokenizer, random weights (no weights travel)
        cfg = ModelConfig(name="smollm2_135m", source="random", tokenizer="embedded", dtype="bfloat16", **SMOLLM2_SHAPE)
    else:
        cfg = ModelConfig(name="tiny_llama", source="random", tokenizer="embedded", dtype="bfloat16")
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer, device=device)
    prompts = ["Hi.", "A longer prompt, so that the others are left-padded by several tokens.", "Why?"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        real = mask.bool()
        logp, _ = completion_logprobs(model, ids, mask, completion_len=2)
    rows = [{"prompt": p} for p in prompts[:2]]
    rollout = generate_rollout(
        model, tokenizer, rows, group_size=4, max_new_tokens=32, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        train_logp, _ = completion_logprobs(
            model, rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1]
        )
    m = rollout.completion_mask.bool()
    d = (train_logp - rollout.logp)[m].double()  # log ratio at the start of an update without recompute
    result = {
        "attention": model.config._attn_implementation,
        "padded_positions": int((~real).sum()),
        "real_logits_finite": bool(torch.isfinite(logits[real]).all()),
        "padded_logits_finite": bool(torch.isfinite(logits[~real]).all()),
        "logprobs_finite": bool(torch.isfinite(logp).all()),
        "sampling_vs_training_logp_max_abs": float(d.abs().max()),
        "approx_kl_without_recompute": float((torch.expm1(d) - d).mean()),
    }
    if not (result["real_logits_finite"] and result["logprobs_finite"]):
        raise CheckFailed(f"non-finite logits or log-probs on a left-padded batch: {result}")
    return result


def section_kernels(sizes: Sizes, out: Path) -> dict:
    from experiments.gpu_measure import addmm_timing, kernel_rows

    rows = [
        row
        for name, hidden, vocab in sizes.kernel_shapes
        for row in kernel_rows(name, hidden, vocab, sizes.kernel_rows, sizes.device)
    ]
    _, hidden, vocab = sizes.kernel_shapes[0]  # the 8B's
    result = {"rows": rows, "addmm": addmm_timing(hidden, vocab, sizes.device)}
    bench = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "bench_logprobs.py"),
            *sizes.bench,
            "--output",
            str(out / "bench_logprobs.md"),
        ],
        capture_output=True,
        text=True,
        timeout=seconds_left(600),
        check=False,
        cwd=ROOT,
    )
    result["bench_logprobs"] = (
        bench.stdout.strip() if bench.returncode == 0 else f"bench_logprobs.py failed:\n{bench.stderr[-2000:]}"
    )
    bad = [r for r in rows if not r["ok"]]
    if bad or bench.returncode != 0:
        raise CheckFailed(f"{len(bad)} kernel comparisons out of tolerance; bench exit {bench.returncode}")
    return result


def section_embedded(sizes: Sizes, out: Path) -> dict:
    """GRPO and PPO on the embedded model, bf16 full fine-tuning (fp32 master weights)."""
    result = {}
    for algo in ("grpo", "ppo"):
        result[algo] = resumed_runs(
            algo,
            [f"algo={algo}", *sizes.embedded, "trainer.precision=bf16"],
            out / "embedded",
            sizes.embedded_steps,
            sizes,
        )
    failed = [a for a, r in result.items() if not r["resume"]["ok"]]
    if failed:
        raise CheckFailed(f"resume did not reproduce the uninterrupted run for {failed}: {result}")
    return result


def section_8b(sizes: Sizes, out: Path) -> dict:
    """GRPO and PPO on the 8B-shaped random Llama under trainer=h100: a warm-up step, then the timed step.

    The first step pays for torch.compile of the decode step and its CUDA-graph capture (and the allocator's
    first growth): its time is reported (`cold_generate_s`, and the warm-up's extra generate seconds) but the
    tokens/s and the bandwidth fraction are the second step's."""
    from experiments.gpu_measure import peak_bandwidth, phase_seconds, projected_peak

    model = [
        "model=r1_distill_llama_8b",
        "model.source=random",
        "model.path=null",
        "model.tokenizer=embedded",
        "model.chat_template=r1_distill",
        *(f"model.{k}={v}" for k, v in sizes.big.items()),
    ]
    n = override_value(sizes.big_run, "algo.prompts_per_step") * override_value(sizes.big_run, "algo.group_size")
    micro = override_value(sizes.big_run, "algo.micro_batch_size")
    bandwidth = peak_bandwidth()
    result = {}
    for algo in ("grpo", "ppo"):
        steps = run_py(
            [
                f"algo={algo}",
                *model,
                "trainer=h100",
                "trainer.max_steps=2",  # step 1 warms up (compile, capture), step 2 is timed
                "trainer.save_final=false",
                "data.eval_size=0",
                *sizes.big_run,
            ],
            out / "8b" / algo,
            sizes,
        )
        cold, m = steps[0], steps[-1]
        projection = max(
            (projected_peak(sizes.big, algo, n, step, micro) for step in steps), key=lambda p: p["peak_gib"]
        )
        peak_gib = max(step.get("memory/peak_cuda_mb", 0.0) for step in steps) / 1024  # since the start
        decode_steps = m["completion/length_max"]
        fraction = (
            projection["weight_bytes"] * decode_steps / m["time/generate"] / bandwidth[1]
            if bandwidth and m["time/generate"] > 0
            else None
        )
        # the warm-up's generate time beyond the warm step's, per decode step: compile + capture (+ first growth)
        warm_per_decode_step = m["time/generate"] / max(decode_steps, 1)
        result[algo] = {
            "phases_s": phase_seconds(steps),
            "timed_step": len(steps),
            "cold_step_s": cold["time/step"],
            "warm_step_s": m["time/step"],
            "cold_generate_s": cold["time/generate"],
            "warm_generate_s": m["time/generate"],
            "warmup_extra_generate_s": cold["time/generate"] - warm_per_decode_step * cold["completion/length_max"],
            "tokens_generated": m["tokens/generated"],
            "generated_tokens_per_s": m["tokens/generated"] / m["time/generate"],
            "peak_cuda_gib": peak_gib,
            "projected_gib": projection["peak_gib"],
            "measured_over_projected": peak_gib / projection["peak_gib"] if peak_gib else None,
            "projection": projection,
            "decode_steps": decode_steps,
            "assumed_peak_bandwidth": bandwidth,
            "decode_bandwidth_fraction": fraction,
            "approx_kl": m.get("approx_kl"),
            "clip_frac": m.get("clip_frac"),
            "optimizer_steps": m.get("optimizer_steps"),
            "skipped_steps": m.get("skipped_steps"),
        }
        if len(steps) < 2:
            raise CheckFailed(f"{algo}: {len(steps)} step(s) logged, 2 expected (a warm-up and a timed step)")
        if m.get("optimizer_steps", 0) < 1 or m.get("skipped_steps", 0) > 0:
            raise CheckFailed(f"{algo}: an update was skipped (non-finite): {result[algo]}")
    return result


def section_fsdp(sizes: Sizes, out: Path) -> dict:
    """trainer.strategy=fsdp (bf16 full fine-tuning) in one torchrun process: NCCL on a GPU, gloo on a CPU."""
    args = ["algo=grpo", *sizes.embedded, "trainer.strategy=fsdp", "trainer.precision=bf16"]
    result = resumed_runs("grpo_fsdp", args, out / "fsdp", sizes.fsdp_steps, sizes, torchrun=True)
    if not result["resume"]["ok"]:
        raise CheckFailed(f"the fsdp resume did not reproduce the uninterrupted run: {result['resume']}")
    return result


def override_value(args: tuple[str, ...], key: str) -> int:
    """The integer of `key=N` among run.py overrides."""
    return int(next(a.split("=", 1)[1] for a in args if a.startswith(key + "=")))


ROLLOUT_LOGP_GAP = 0.1  # mean |sampling-time log-prob - teacher-forced|: ~1e-5 in fp32, bf16 rounding is far below


def section_rollout(sizes: Sizes, out: Path) -> dict:
    """experiments/bench_rollout.py: our samplers (dynamic, static, compiled) against model.generate and the floors;
    on a GPU the 8B shape at batch 64, with tokens/s and the share of peak memory bandwidth the decode reaches."""
    from experiments.bench_rollout import markdown, measure, parse_args

    report = measure(parse_args(list(sizes.rollout)))
    text = markdown(report)
    (out / "bench_rollout.md").write_text(text)
    fp32 = sizes.device == "cpu"  # in bf16, kernels that round differently may flip a near-tie: tokens can part
    gaps = {name: r["forward_logp_gap"] for name, r in report["results"].items() if "forward_logp_gap" in r}
    if fp32 and not report["same_tokens"]:
        raise CheckFailed("our samplers (dynamic, static, compiled) drew different tokens in fp32\n" + text)
    if max(gaps.values()) > ROLLOUT_LOGP_GAP:
        raise CheckFailed(
            f"a sampler's recorded log-probs are off a teacher-forced forward's by more than "
            f"{ROLLOUT_LOGP_GAP} on average: {gaps}\n" + text
        )
    return {"markdown": text, "forward_logp_gap": gaps, "samplers": sampler_speeds(report)}


def sampler_speeds(report: dict) -> dict:
    """Per sampler of bench_rollout's report: the cold first call (for the compiled one: torch.compile, the
    CUDA-graph capture and one decode) apart from the steady state (the median of the warm calls after it), and
    the steady state's tokens/s and share of peak HBM bandwidth (weight bytes x decode steps / s / peak)."""
    steps, sequences, peak = report["decode_steps"], report["sequences"], report.get("peak_bandwidth")
    out = {}
    for name, r in report["results"].items():
        if "first" not in r:
            continue  # the teacher-forced forward: no decode
        out[name] = {
            "first_call_s": r["first"],
            "steady_s": r["seconds"],
            "compile_capture_s": max(r["first"] - r["seconds"], 0.0),  # the cold call's extra seconds
            "steady_tokens_per_s": steps * sequences / r["seconds"],
            "hbm_bandwidth_share": report["weight_bytes"] * steps / r["seconds"] / peak if peak else None,
        }
    return out


def section_packing(sizes: Sizes, out: Path) -> dict:
    """Padded against packed training passes (`experiments/bench_train.py`): a SmolLM2-135M-shaped random Llama on
    the GPU (the tiny one under --tiny), tokens forwarded, time and memory ratios, and the two paths' agreement."""
    report = out / "bench_train.json"
    args = ["--device", sizes.device, "--json", str(report)]
    args += ["--quick"] if sizes.device == "cpu" else ["--model", "smollm2_random", "--budget", "4096"]
    bench = bounded(
        [sys.executable, str(ROOT / "experiments" / "bench_train.py"), *args],
        seconds_left(600),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if bench.returncode != 0 or not report.exists():
        raise RuntimeError(f"bench_train.py exited with {bench.returncode}: {bench.stderr[-2000:]}")
    figures = json.loads(report.read_text())
    packed = figures["modes"][1]
    result = {"ratios": figures["ratios"], "targets": figures["targets"], "table": figures["table"]}
    result["exactness"] = {k: packed.get(k) for k in ("ref_logp_max_abs_diff", "grad_max_abs_diff_rel")}
    # fp32 (TF32 matmuls where the process enables them): the paths sum in other orders, nothing more
    if not (packed["ref_logp_max_abs_diff"] < 1e-2 and packed["grad_max_abs_diff_rel"] < 1e-2):
        raise CheckFailed(f"packed and padded passes disagree: {result['exactness']}")
    return result


def section_environment(sizes: Sizes, out: Path) -> dict:
    return environment()


SECTIONS = {  # in the order they run: the order of value
    "environment": section_environment,
    "kernels": section_kernels,
    "rollout": section_rollout,
    "8b": section_8b,
    "embedded": section_embedded,
    "fsdp": section_fsdp,
    "packing": section_packing,
    "probe": section_probe,
}


def _record(fn, sizes: Sizes, out: Path) -> dict:
    """fn(sizes, out) with its failure caught (status fail: a check did not hold; error: it crashed)."""
    try:
        return {"status": "pass", "result": fn(sizes, out)}
    except CheckFailed as err:
        return {"status": "fail", "error": str(err)[-4000:], "traceback": traceback.format_exc()[-3000:]}
    except Exception as err:  # the next section still runs
        if isinstance(err, subprocess.TimeoutExpired):
            err = RuntimeError(f"a process ran past the budget's end or its timeout ({err.timeout:.0f} s)")
        return {
            "status": "error",
            "error": f"{type(err).__name__}: {str(err)[-4000:]}",
            "traceback": traceback.format_exc()[-3000:],
        }


def _isolated(name: str, sizes: Sizes, out: Path) -> dict:
    """The section in a child process (`--child NAME`), killed at the budget's end; its record."""
    record_file = out / f"{name}.section.json"
    record_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--child", name]
    if sizes.device == "cpu":
        cmd.append("--tiny")
    proc = bounded(cmd, seconds_left(3600), cwd=ROOT)
    if not record_file.exists():
        raise RuntimeError(f"the child process of section {name} exited with {proc.returncode} and no record")
    return json.loads(record_file.read_text())


def run_section(name: str, sizes: Sizes, out: Path) -> dict:
    """One section, its failure caught and recorded, with its wall time."""
    start = time.perf_counter()
    if name in ISOLATED:
        record = _record(lambda sizes, out: _isolated(name, sizes, out), sizes, out)
        if record["status"] == "pass":
            record = record["result"]  # the child's own record
    else:
        record = _record(SECTIONS[name], sizes, out)
    record["seconds"] = time.perf_counter() - start
    try:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the run.py sections get the whole GPU
    except Exception:
        pass
    return record


# ---------------------------------------------------------------- the report


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _phases(phases: dict) -> str:
    return ", ".join(
        f"{k} {_fmt(v['step_1'])}" + (f" / {_fmt(v['later_mean'])}" if v["later_mean"] is not None else "")
        for k, v in phases.items()
    )


def _seconds(section: dict) -> str:
    return f"{section['seconds']:.1f}" if "seconds" in section else "-"


def _one_line(section: dict) -> str:
    """A failed or skipped section's error on one line (for the status table)."""
    if "error" not in section:
        return ""
    line = section["error"].strip().splitlines()[0] if section["error"].strip() else ""
    return (line[:200] + " ...") if len(line) > 200 else line


def markdown(report: dict) -> str:
    """gpu_check.md: the environment, one status line per section, then each section's figures."""
    lines = [
        f"# GPU check ({report['mode']}), {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget"
        + ("" if report.get("finished") else " (in progress, or stopped: this report is rewritten per section)"),
        "",
    ]
    env = report["sections"].get("environment", {}).get("result")
    if env:
        lines += ["| | |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in env.items()), ""]
    lines += ["| section | status | seconds | estimate s | |", "|---|---|---:|---:|---|"]
    lines += [
        f"| {name} | {s['status']} | {_seconds(s)} | {s['estimate_s']} | {_one_line(s)} |"
        for name, s in report["sections"].items()
    ]
    for name, s in report["sections"].items():
        lines += ["", f"## {name}: {s['status']}", ""]
        if s["status"] == "skipped":
            lines += [s["error"]]
            continue
        if s["status"] == "running":
            lines += ["started; the check was stopped during this section if this is the final report"]
            continue
        if s["status"] != "pass":
            lines += [s["error"], "", "```", s["traceback"], "```"]
            continue
        r = s["result"]
        if name == "environment":
            lines += ["(the table above)"]
        elif name == "probe":
            lines += [f"- {k}: {_fmt(v)}" for k, v in r.items()]
        elif name == "kernels":
            lines += [
                "max |kernel - reference| / max |reference| (log_softmax of the same dtype's logits in fp32)",
                "",
                "| shape | dtype | backend | path | errors | ok |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {row['shape']} | {row['dtype']} | {row['backend']} | {row['path']} | "
                + ", ".join(f"{k} {v:.1e}" for k, v in row["errors"].items())
                + f" | {row['ok']} |"
                for row in r["rows"]
            ]
            lines += [
                "",
                "fused backward, one chunk's lm_head gradient: "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in r["addmm"].items()),
                "",
                r["bench_logprobs"],
            ]
        elif name in ("embedded", "fsdp"):
            runs = r if name == "embedded" else {"grpo (fsdp)": r}
            lines += ["seconds per phase: step 1 / mean of the later steps", ""]
            for algo, run in runs.items():
                resume = run["resume"]
                lines += [
                    f"- **{algo}**: {_phases(run['phases_s'])}; peak CUDA {_fmt(run['peak_cuda_mb'])} MiB; "
                    f"tokens per step {run['tokens_generated_per_step']}; step 1 approx_kl "
                    f"{_fmt(run['step1_approx_kl'])}, clip_frac {_fmt(run['step1_clip_frac'])}; resume: "
                    f"bit-exact {resume['bit_exact']}, weight diff / last update "
                    f"{_fmt(resume['weight_diff_over_last_step_update'])}, metric diffs "
                    + ", ".join(f"{k} {_fmt(v)}" for k, v in resume["metric_abs_diff"].items())
                ]
        elif name == "rollout":
            lines += [
                "cold first call (compiled: torch.compile + CUDA-graph capture + one decode) apart from the "
                "steady state (median of the warm calls)",
                "",
                "| sampler | first call s | compile/capture s | steady s | steady tokens/s | share of peak HBM |",
                "|---|---:|---:|---:|---:|---:|",
                *(
                    f"| {k} | {_fmt(v['first_call_s'])} | {_fmt(v['compile_capture_s'])} | {_fmt(v['steady_s'])} | "
                    f"{v['steady_tokens_per_s']:,.0f} | {_fmt(v['hbm_bandwidth_share'])} |"
                    for k, v in r.get("samplers", {}).items()
                ),
                "",
                r["markdown"],
            ]
        elif name == "8b":
            lines += ["seconds per phase: the warm-up step (compile, capture) / the timed step", ""]
            for algo, run in r.items():
                bw = run["assumed_peak_bandwidth"]
                lines += [
                    f"- **{algo}**: {_phases(run['phases_s'])} s; timed step {_fmt(run['warm_step_s'])} s "
                    f"(warm-up {_fmt(run['cold_step_s'])} s, its generate {_fmt(run['warmup_extra_generate_s'])} s "
                    f"longer than the timed step's pace); {_fmt(run['generated_tokens_per_s'])} "
                    f"generated tokens/s in the timed step ({run['tokens_generated']:.0f} tokens, "
                    f"{run['decode_steps']:.0f} decode steps); peak CUDA {_fmt(run['peak_cuda_gib'])} GiB vs projected "
                    f"{_fmt(run['projected_gib'])} GiB (ratio {_fmt(run['measured_over_projected'])}); "
                    f"decode bandwidth fraction {_fmt(run['decode_bandwidth_fraction'])} of "
                    f"{_fmt(bw[1] / 1e12) + ' TB/s assumed for ' + bw[0] if bw else 'an unknown peak'}; "
                    f"approx_kl {_fmt(run['approx_kl'])}, clip_frac {_fmt(run['clip_frac'])}"
                ]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """gpu_check.json and gpu_check.md, each written to a temp file and renamed over the old (atomic)."""
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=1, default=str)),
        ("gpu_check.md", markdown(report)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(started: float | None = None) -> int:
    """The check; the budget counts from `started` (the script's start when run as one, else now)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md, gpu_check.json and logs")
    parser.add_argument("--tiny", action="store_true", help="every section on the CPU at tiny shapes")
    parser.add_argument("--sections", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument(
        "--budget-s",
        type=float,
        default=BUDGET_S,
        help="seconds for the whole check: a section whose estimated cost no longer fits is skipped, and no "
        "process runs past the end (default %(default)s)",
    )
    parser.add_argument("--child", choices=sorted(ISOLATED), help=argparse.SUPPRESS)  # one section, in a child
    args = parser.parse_args()
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import torch

    sizes = TINY if args.tiny else GPU
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:  # the parent's timeout bounds it; its record goes back through a file
        record = _record(SECTIONS[args.child], sizes, args.out)
        (args.out / f"{args.child}.section.json").write_text(json.dumps(record, default=str))
        return 0
    if sizes.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device is visible; run with --tiny for the CPU version", file=sys.stderr)
        return 2
    costs = TINY_COST_S if args.tiny else COST_S
    start = time.perf_counter() if started is None else started
    BUDGET["deadline"] = deadline = start + args.budget_s
    report = {
        "mode": "tiny (CPU)" if args.tiny else "GPU",
        "budget_s": args.budget_s,
        "seconds": 0.0,
        "finished": False,
        "sizes": asdict(sizes),
        "sections": {},
    }
    for name in args.sections:
        left = deadline - time.perf_counter()
        need = costs.get(name, 0)
        if need > left:
            report["sections"][name] = {
                "status": "skipped",
                "error": f"skipped: needs ~{need} s, {max(left, 0):.0f} s left of the budget",
                "estimate_s": need,
            }
        else:
            report["sections"][name] = {"status": "running", "estimate_s": need}
            report["seconds"] = time.perf_counter() - start
            write_report(report, args.out)  # a run stopped in this section says so
            report["sections"][name] = {**run_section(name, sizes, args.out), "estimate_s": need}
        s = report["sections"][name]
        took = f"{s['seconds']:.1f} s, estimate {need} s" if "seconds" in s else s["error"]
        print(f"[gpu_check] {name}: {s['status']} ({took})", file=sys.stderr, flush=True)
        report["env"] = report["sections"].get("environment", {}).get("result", {})
        report["seconds"] = time.perf_counter() - start
        write_report(report, args.out)
    report["finished"] = True
    write_report(report, args.out)
    timings = ", ".join(
        f"{name} {s['seconds']:.1f} s" if "seconds" in s else f"{name} {s['status']}"
        for name, s in report["sections"].items()
    )
    print(f"section timings: {timings}")
    print(f"wrote {args.out / 'gpu_check.md'} and gpu_check.json ({report['seconds']:.0f} s)")
    return 0 if all(s["status"] in ("pass", "skipped") for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(STARTED))
