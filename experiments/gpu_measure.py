"""The measurements of the GPU check (experiments/gpu_check.py): the log-prob kernels against the PyTorch
reference, the fused backward's fp32 accumulation against a bf16 matmul, models.memory's projection of a
run's peak memory, the phase times of a run and a resumed run against the uninterrupted one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# peak HBM bandwidth by GPU name (vendor spec sheets), for the decode bandwidth fraction; the first match wins
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12), ("L40S", 0.864e12)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# max |kernel - reference| / max |reference|: fp32 agrees to summation order; bf16 also to one rounding of the
# logits (a chunk's matmul may round a logit one bf16 step apart from the whole matrix's) and of the gradients
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().float(), reference.detach().float()
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def kernel_rows(name: str, hidden_size: int, vocab_size: int, rows: int, device: str) -> list[dict]:
    """Each log-prob path (fused log-probs, fused loss, chunked from logits) on each backend (torch, triton) in
    fp32 and bf16, against log_softmax of the same dtype's logits in fp32: errors of the log-probs, the entropy
    and the gradients of sum(g * logp + g_ent * entropy)."""
    return [row for dtype in DTYPES for row in _dtype_rows(name, hidden_size, vocab_size, rows, device, dtype)]


def _dtype_rows(name: str, hidden_size: int, vocab_size: int, rows: int, device: str, dtype_name: str) -> list[dict]:
    from models.fused_loss import fused_token_loss
    from models.logprobs import fused_token_logprobs, token_logprobs

    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, hidden_size, generator=g).to(device, dtype)
    weight = (torch.randn(vocab_size, hidden_size, generator=g) * 2 / hidden_size**0.5).to(device, dtype)
    tokens = torch.randint(0, vocab_size, (rows,), generator=g).to(device)
    g_logp, g_ent = (torch.randn(rows, generator=g).to(device) for _ in range(2))

    def leaves():
        return hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def objective(logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        return (g_logp * logp + g_ent * entropy).sum()

    def reference_of(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp_all = logits.float().log_softmax(-1)
        return logp_all.gather(-1, tokens[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)

    h, w = leaves()
    ref_logp, ref_ent = reference_of(h @ w.T)
    objective(ref_logp, ref_ent).backward()
    reference = {"logp": ref_logp, "entropy": ref_ent, "grad_hidden": h.grad, "grad_weight": w.grad}
    z = (hidden @ weight.T).detach().requires_grad_()
    objective(*reference_of(z)).backward()
    reference["grad_logits"] = z.grad

    out = []
    for backend in ("torch", "triton"):
        h, w = leaves()
        logp, ent = fused_token_logprobs(
            h[None], w, tokens[None], with_entropy=True, entropy_grad=True, backend=backend
        )
        objective(logp[0], ent[0]).backward()
        got = {"logp": logp[0], "entropy": ent[0], "grad_hidden": h.grad, "grad_weight": w.grad}
        out.append(_row(name, hidden_size, vocab_size, dtype_name, backend, "fused_token_logprobs", got, reference))

        h, w = leaves()
        loss, logp, ent = fused_token_loss(
            h[None],
            w,
            tokens[None],
            lambda lp, e, pos: g_logp[pos] * lp + g_ent[pos] * e,
            with_entropy=True,
            backend=backend,
        )
        loss.backward()
        got = {"logp": logp[0], "entropy": ent[0], "grad_hidden": h.grad, "grad_weight": w.grad}
        out.append(_row(name, hidden_size, vocab_size, dtype_name, backend, "fused_token_loss", got, reference))

        z = (hidden @ weight.T).detach().requires_grad_()
        logp, ent = token_logprobs(z[None], tokens[None], with_entropy=True, entropy_grad=True, backend=backend)
        objective(logp[0], ent[0]).backward()
        got = {"logp": logp[0], "entropy": ent[0], "grad_logits": z.grad}
        out.append(_row(name, hidden_size, vocab_size, dtype_name, backend, "token_logprobs", got, reference))
    return out


def _row(name, hidden_size, vocab_size, dtype, backend, path, got, reference) -> dict:
    errors = {k: relative_error(v, reference[k]) for k, v in got.items()}
    return {
        "shape": f"{name} (H {hidden_size}, V {vocab_size})",
        "dtype": dtype,
        "backend": backend,
        "path": path,
        "errors": errors,
        "ok": max(errors.values()) <= TOLERANCE[dtype],
    }


def addmm_timing(hidden_size: int, vocab_size: int, device: str, repeats: int = 5) -> dict:
    """One chunk of the fused backward's lm_head gradient, `grad_weight.addmm_(dlogits.T.float(), h.float())`
    (fp32 accumulation over chunks), against the bf16 matmul `dlogits.T @ h` it could be; median ms each."""
    from models.logprobs import chunk_budget, default_chunk_rows

    rows = default_chunk_rows(vocab_size, chunk_budget(device))
    dlogits = torch.randn(rows, vocab_size, device=device, dtype=torch.bfloat16)
    h = torch.randn(rows, hidden_size, device=device, dtype=torch.bfloat16)
    grad_weight = torch.zeros(vocab_size, hidden_size, device=device)

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[len(times[1:]) // 2] * 1e3

    fp32 = median_ms(lambda: grad_weight.addmm_(dlogits.T.float(), h.float()))
    bf16 = median_ms(lambda: torch.mm(dlogits.T, h))
    flop = 2 * rows * vocab_size * hidden_size
    return {
        "chunk_rows": rows,
        "fp32_addmm_ms": fp32,
        "bf16_mm_ms": bf16,
        "fp32_over_bf16": fp32 / bf16,
        "fp32_tflops": flop / fp32 / 1e9,
        "bf16_tflops": flop / bf16 / 1e9,
        "tf32_allowed": torch.backends.cuda.matmul.allow_tf32,
    }


def projected_peak(arch_fields: dict, algo: str, sequences: int, metrics: dict, micro_batch: int) -> dict:
    """models.memory's projection of the peak of one step under trainer=h100 (LoRA r=16, bf16, checkpointing):
    static (weights, gradients, AdamW) + the larger of the training activations of one micro-batch and the
    sampling KV cache, with the step's mean prompt and longest completion lengths."""
    from conf.registry import get_stage
    from conf.schema import LLAMA_LORA_TARGETS
    from models.memory import Architecture, project

    arch = Architecture(**arch_fields)
    critic = "critic" in get_stage(algo).models  # the models the algorithm keeps besides the actor
    models = project(arch, 2, 16, list(LLAMA_LORA_TARGETS), reference=True, critic=critic)
    static = sum(m.static for m in models)
    prompt = metrics["tokens/prompt"] / sequences  # mean real prompt tokens
    completion = metrics["completion/length_max"]
    seq = prompt + completion
    activations = (2 if critic else 1) * micro_batch * seq * arch.activation_bytes_per_token(
        2, True
    ) + micro_batch * completion * arch.logits_bytes_per_token()
    kv_cache = sequences * seq * arch.kv_cache_bytes_per_token(2)
    peak = static + max(activations, kv_cache)
    weight_bytes = sum(m.weights for m in models if not m.name.startswith("critic"))  # what a decode step reads
    return {
        "static_gib": static / 2**30,
        "activations_gib": activations / 2**30,
        "kv_cache_gib": kv_cache / 2**30,
        "peak_gib": peak / 2**30,
        "weight_bytes": weight_bytes,
        "mean_prompt_tokens": prompt,
    }


def phase_seconds(steps: list[dict]) -> dict[str, dict[str, float]]:
    """Seconds per phase (time/step, time/generate, ...): step 1 (warm-up included) and the mean of the others."""
    phases = sorted(
        {k for m in steps for k in m if k.startswith("time/") and not k.endswith("_total") and k != "time/total"}
    )
    out = {}
    for key in phases:
        later = [m[key] for m in steps[1:] if key in m]
        out[key.removeprefix("time/")] = {
            "step_1": steps[0].get(key, 0.0),
            "later_mean": sum(later) / len(later) if later else None,
        }
    return out


def compare_resume(full: Path, resumed: Path, prev_ckpt: Path, device: str) -> dict:
    """The resumed run's last step and final weights against the uninterrupted run's."""
    from safetensors.torch import load_file

    a, b = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (full, resumed))
    keys = [
        k
        for k in (
            "loss",
            "kl",
            "approx_kl",
            "grad_norm/actor",
            "grad_norm/critic",
            "reward/total_mean",
            "tokens/generated",
        )
        if k in a
    ]
    metric_diff = {k: abs(a[k] - b.get(k, float("nan"))) for k in keys}
    diff = moved = 0.0
    files = sorted(
        p.relative_to(full / "checkpoints" / "final") for p in (full / "checkpoints" / "final").rglob("*.safetensors")
    )
    exact = all(v == 0 for v in metric_diff.values())
    for rel in files:
        w_full, w_res, w_prev = (
            load_file(d / rel) for d in (full / "checkpoints" / "final", resumed / "checkpoints" / "final", prev_ckpt)
        )
        for k in w_full:
            exact = exact and torch.equal(w_full[k], w_res[k])
            diff += float((w_full[k].float() - w_res[k].float()).abs().sum())
            moved += float((w_full[k].float() - w_prev[k].float()).abs().sum())
    ratio = diff / moved if moved else 0.0
    # a CPU repeats itself bit for bit; CUDA kernels with atomics (index_add, attention backward) may not
    ok = exact or (device == "cuda" and ratio < 0.05 and metric_diff.get("tokens/generated", 0) == 0)
    return {
        "bit_exact": exact,
        "weight_diff_over_last_step_update": ratio,
        "metric_abs_diff": metric_diff,
        "files": [str(f) for f in files],
        "ok": ok,
    }


def peak_bandwidth() -> tuple[str, float] | None:
    """(GPU name, assumed peak memory bandwidth in bytes/s) from PEAK_BANDWIDTH, None when unknown."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next(((name, bw) for key, bw in PEAK_BANDWIDTH if key in name), None)
