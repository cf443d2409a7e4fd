"""Rollout speed on the same prompts: this project's sampler against `model.generate`, a teacher-forced
forward and the floors of the hardware, all measured in one run.

    OMP_NUM_THREADS=1 python experiments/bench_rollout.py        # CPU: the default GRPO step's rollout
    python experiments/bench_rollout.py --device cuda --shape 8b --prompts 16 --group-size 4 --max-new-tokens 256

Rows (median of --repeats after one warm-up; the compiled step's compile time is reported apart):
- ours dynamic: the eager loop over a growing DynamicCache (algo.rollout.cache=dynamic, the reference);
- ours static: the preallocated cache and fixed-shape step, eager, through the model's modules
  (algo.rollout.cache=static compile=false pack=false);
- ours static packed (CPU): the same step on oneDNN-packed weights, q/k/v and gate/up fused (pack=true, the
  CPU default; models.packed), the pack included in the time;
- ours compiled: the same step under torch.compile (reduce-overhead = CUDA graphs on a GPU);
- model.generate: transformers' sampler with the same temperature / top_p, forced to the same number of
  new tokens (min_new_tokens = max_new_tokens = our decode steps);
- forward: one teacher-forced no-grad forward over the finished sequences (what scoring them costs);
- floors: decode steps x the time to read every weight once (the weight-streaming floor), and decode steps x
  max(that, the step's matmul FLOPs at this device's measured matmul throughput) (the roofline floor: at
  small batches on a CPU the matmuls, not the memory, bound a decode step), and decode steps x the time of
  one step's matmuls alone in this build's GEMM library (what no change around the matmuls can go below).
Our three samplers draw the same tokens (prompt-seeded sampling); the table says whether they did.
`--device cuda` adds tokens/s and the share of the GPU's peak memory bandwidth the decode reaches
(weight bytes x decode steps / time / peak). Writes a markdown table to --out.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from algorithms.rollout import RolloutConfig, generate_rollout  # noqa: E402


def eight_b_overrides() -> list[str]:
    """A Llama with DeepSeek-R1-Distill-Llama-8B's shapes and random weights, in bf16 (no download)."""
    from models.memory import KNOWN_ARCHITECTURES

    shape = KNOWN_ARCHITECTURES["deepseek-ai/DeepSeek-R1-Distill-Llama-8B"]
    return [
        "model=r1_distill_llama_8b",
        "model.source=random",
        "model.path=null",
        "model.tokenizer=embedded",
        "model.chat_template=r1_distill",
        "model.dtype=bfloat16",
        *(f"model.{k}={v}" for k, v in shape.items()),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--shape",
        default="embedded",
        choices=("embedded", "8b", "tiny"),
        help="the embedded SmolLM2-135M (fp32 on a CPU, bf16 on a GPU), an 8B-shaped random Llama (bf16) "
        "or the tests' tiny Llama",
    )
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled sampler")
    p.add_argument("--no-generate", action="store_true", help="skip model.generate")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown report (default docs/results/assets/<date>-bench-rollout/bench_rollout_<device>_<shape>.md)",
    )
    return p.parse_args(argv)


def load(args: argparse.Namespace):
    """(model, tokenizer, rows): the model of --shape on --device and the first prompts of the default data."""
    from conf.registry import discover
    from conf.schema import compose_config
    from models.loading import load_causal_lm, load_tokenizer
    from run import load_data

    embedded_dtype = "bfloat16" if args.device == "cuda" else "float32"
    model_overrides = {
        "embedded": ["model=smollm2_135m", f"model.dtype={embedded_dtype}"],
        "8b": eight_b_overrides(),
        "tiny": ["model=tiny_llama"],
    }[args.shape]
    discover()
    cfg = compose_config(["algo=grpo", *model_overrides, "logger.mode=disabled"])
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, tokenizer, device=torch.device(args.device)).eval()
    train_rows, _, _ = load_data(cfg, tokenizer)
    return model, tokenizer, train_rows[: args.prompts]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, float, object]:
    """(first call s, median of the next `repeats` calls s, last result)."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def matmul_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights a decode step multiplies by: every 2-D parameter but the input embedding (a lookup), with
    the output embedding counted once even when tied."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    weights = [p for p in model.parameters() if p.dim() == 2 and p is not embed]
    return weights + ([head] if head is embed else [])


def stream_seconds(weights: list[torch.Tensor], device: str, repeats: int) -> float:
    """Time to read every weight once (a reduction over each): the weight-streaming floor of one step."""

    def read():
        return [w.amax() for w in weights]

    return timed(read, device, max(repeats, 5))[1]


def products_seconds(products: list[tuple], rows: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    """Time of one call of each (product, input width) on a random [rows, width] input: a decode step's matmuls
    alone, with no attention, norms, sampling or Python around them."""
    inputs = {width: torch.randn(rows, width, device=device, dtype=dtype) for _, width in products}

    def run():
        with torch.inference_mode():
            return [product(inputs[width]) for product, width in products]

    return timed(run, device, max(repeats, 5))[1]


def gemm_seconds(weights: list[torch.Tensor], rows: int, device: str, repeats: int) -> float:
    """One decode step's matmuls, [rows, in] x every weight, in this build's GEMM library (what nn.Linear calls)."""
    products = [(functools.partial(torch.nn.functional.linear, weight=w), w.shape[1]) for w in weights]
    return products_seconds(products, rows, weights[0].dtype, device, repeats)


def packed_gemm_seconds(model: torch.nn.Module, rows: int, repeats: int) -> tuple[float, float]:
    """(one decode step's matmuls alone on the packed, fused weights of models.packed, the pack itself): the
    matmul floor of `rollout.pack=true`."""
    from models.packed import PackedProjections

    dtype = model.get_output_embeddings().weight.dtype
    _, pack, projections = timed(lambda: PackedProjections(model, rows, dtype), "cpu", 1)
    linears = [*projections.qkv, *projections.o, *projections.gate_up, *projections.down, projections.lm_head]
    return products_seconds([(lin, lin.weight.shape[1]) for lin in linears], rows, dtype, "cpu", repeats), pack


def matmul_flops_per_second(dtype: torch.dtype, device: str) -> float:
    """This device's dense matmul throughput in `dtype` (a 2048^3 product on a CPU, 8192^3 on a GPU)."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, 3)[1]


def generate_seconds(model, tokenizer, rows, args, new_tokens: int) -> tuple[float, float]:
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    enc = enc.to(args.device)

    def run():
        torch.manual_seed(0)
        with torch.inference_mode():
            return model.generate(
                **enc,
                do_sample=True,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                num_return_sequences=args.group_size,
                pad_token_id=tokenizer.pad_token_id,
            )

    first, median, _ = timed(run, args.device, args.repeats)
    return first, median


def forward_seconds(model, rollout, args) -> float:
    from models.forward import position_ids

    positions = position_ids(rollout.attention_mask)

    def run():
        with torch.inference_mode():
            return model(
                input_ids=rollout.input_ids,
                attention_mask=rollout.attention_mask,
                position_ids=positions,
                logits_to_keep=rollout.completion_ids.shape[1],
            ).logits

    return timed(run, args.device, args.repeats)[1]


def agreement(model, rollout, reference, temperature: float) -> dict[str, float]:
    """How a sampler's draws compare: the share of its tokens equal to the reference sampler's (in bf16 kernels
    that round differently can flip a near-tie, and the samples part from there), and the mean |difference|
    between the log-probs it recorded and a teacher-forced forward's over its own samples (what training
    assumes: small whatever the dtype, unless the sampler is wrong)."""
    from models.logprobs import completion_logprobs

    width = min(rollout.completion_ids.shape[1], reference.completion_ids.shape[1])
    same = (rollout.completion_ids[:, :width] == reference.completion_ids[:, :width]).float().mean()
    with torch.inference_mode():
        logp, _ = completion_logprobs(
            model, rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1], temperature=temperature
        )
    real = rollout.completion_mask.bool()
    return {"same_token_share": float(same), "forward_logp_gap": float((logp - rollout.logp)[real].abs().mean())}


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, tokenizer, rows = load(args)
    seeds = list(range(1, len(rows) + 1))
    samplers = {
        "ours dynamic": RolloutConfig(cache="dynamic"),
        "ours static": RolloutConfig(compile="false", pack="false"),
    }
    if args.device == "cpu":
        samplers["ours static packed"] = RolloutConfig(compile="false", pack="true")
    if not args.no_compile:
        samplers["ours compiled"] = RolloutConfig(compile="true")
    results, rollouts = {}, {}
    for name, cfg in samplers.items():

        def run(cfg=cfg):
            return generate_rollout(
                model,
                tokenizer,
                rows,
                args.group_size,
                args.max_new_tokens,
                args.temperature,
                args.top_p,
                prompt_seeds=seeds,
                rollout=cfg,
            )

        first, median, rollouts[name] = timed(run, args.device, args.repeats)
        results[name] = {"seconds": median, "first": first}
        print(f"{name}: {median:.3f} s (first call {first:.3f} s)", file=sys.stderr, flush=True)
    reference = rollouts["ours dynamic"]
    same = all(torch.equal(r.completion_ids, reference.completion_ids) for r in rollouts.values())
    logp_gap = max(float((r.logp - reference.logp).abs().max()) for r in rollouts.values()) if same else None
    for name, rollout in rollouts.items():
        results[name] |= agreement(model, rollout, reference, args.temperature)
    steps = reference.completion_ids.shape[1]  # decode steps: the longest completion
    if not args.no_generate:
        first, median = generate_seconds(model, tokenizer, rows, args, steps)
        results["model.generate"] = {"seconds": median, "first": first}
    results["forward"] = {"seconds": forward_seconds(model, reference, args)}
    weights = matmul_weights(model)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    stream = stream_seconds(weights, args.device, args.repeats)
    flops_step = 2 * sum(w.numel() for w in weights) * len(reference.completions)
    peak_flops = matmul_flops_per_second(weights[0].dtype, args.device)
    floors = {
        "stream": steps * stream,
        "roofline": steps * max(stream, flops_step / peak_flops),
        "matmuls": steps * gemm_seconds(weights, len(reference.completions), args.device, args.repeats),
    }
    if "ours static packed" in results:
        packed, pack = packed_gemm_seconds(model, len(reference.completions), args.repeats)
        floors["packed matmuls"] = steps * packed + pack
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
        "same_tokens": same,
        "logp_gap": logp_gap,
        "decode_steps": steps,
        "sequences": len(reference.completions),
        "weight_bytes": weight_bytes,
        "stream_seconds": stream,
        "matmul_tflops": peak_flops / 1e12,
        "floors": floors,
        "threads": torch.get_num_threads(),
    }
    if args.device == "cuda":
        from experiments.gpu_measure import peak_bandwidth

        bandwidth = peak_bandwidth()
        report["gpu"] = torch.cuda.get_device_name()
        report["peak_bandwidth"] = bandwidth[1] if bandwidth else None
    return report


def markdown(report: dict) -> str:
    a, results, floors = report["args"], report["results"], report["floors"]
    lines = [
        f"# Rollout: {a['shape']} on {a['device']}, {a['prompts']} prompts x G={a['group_size']}, "
        f"{report['decode_steps']} decode steps (max {a['max_new_tokens']}), {report['threads']} thread(s)",
        "",
        f"Weights multiplied per step: {report['weight_bytes'] / 1e6:.0f} MB, read once in "
        f"{report['stream_seconds'] * 1e3:.1f} ms; matmul throughput {report['matmul_tflops']:.3f} TFLOP/s. "
        f"Floors for the whole decode: weight streaming {floors['stream']:.3f} s, roofline "
        f"{floors['roofline']:.3f} s; the decode's matmuls alone (this build's GEMM at this batch) "
        f"{floors['matmuls']:.3f} s"
        + (
            f", on the packed weights {floors['packed matmuls']:.3f} s (the pack included)"
            if "packed matmuls" in floors
            else ""
        )
        + ".",
        "",
        f"Our samplers drew the same tokens: {'yes' if report['same_tokens'] else 'NO'}"
        + (
            f" (largest log-prob gap to the dynamic cache {report['logp_gap']:.1e})"
            if report["same_tokens"]
            else " (see the share of equal tokens per sampler)"
        )
        + ".",
        "",
    ]
    gen = results.get("model.generate", {}).get("seconds")
    header = (
        "| sampler | s | first call s | same tokens as dynamic | mean abs logp - forward's | x stream floor | "
        "x roofline | x matmuls alone | x model.generate |"
    )
    packed = floors.get("packed matmuls")
    if packed:
        header += " x packed matmuls alone |"
    extra = report.get("peak_bandwidth") is not None
    if extra:
        header += " tokens/s | share of peak bandwidth |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, r in results.items():
        s = r["seconds"]
        row = f"| {name} | {s:.3f} | {r['first']:.3f} |" if "first" in r else f"| {name} | {s:.3f} | - |"
        row += (
            f" {r['same_token_share']:.1%} | {r['forward_logp_gap']:.1e} |" if "same_token_share" in r else " - | - |"
        )
        row += f" {s / floors['stream']:.2f} | {s / floors['roofline']:.2f} | {s / floors['matmuls']:.2f} | "
        row += f"{s / gen:.2f} |" if gen else "- |"
        if packed:
            row += f" {s / packed:.2f} |"
        if extra:
            tokens = report["decode_steps"] * report["sequences"] / s
            share = report["weight_bytes"] * report["decode_steps"] / s / report["peak_bandwidth"]
            row += f" {tokens:,.0f} | {share:.0%} |" if name.startswith("ours") else " - | - |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    report = measure(args)
    text = markdown(report)
    print(text)
    dated = ROOT / "docs" / "results" / "assets" / f"{time.strftime('%Y-%m-%d')}-bench-rollout"
    out = args.out or dated / f"bench_rollout_{args.device}_{args.shape}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


if __name__ == "__main__":
    main()
