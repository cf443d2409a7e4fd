"""Benchmark of the chosen-token log-prob paths, forward + backward, each method in its own process.

    python experiments/bench_logprobs.py                       # B=8, T=256, V=49152, H=576, fp32, CPU
    python experiments/bench_logprobs.py --device cuda --dtype bfloat16

Two groups, each with its own naive baseline:
- from hidden states (lm_head included): `naive` = hidden @ W.T, log_softmax, gather; `fused` =
  `fused_token_logprobs` (torch backend); `fused_loss` = `models.fused_loss.fused_token_loss` with the
  loss sum(g * logp) as its per-token function (the gradient formed in the forward: 3 matmuls, not 4);
  `fused_triton`, `fused_loss_triton` (CUDA); `trl` = the same matmul then TRL's `selective_log_softmax`
  (when trl is importable).
- from given logits: `naive_logits` = log_softmax + gather; `chunked` = `token_logprobs`;
  `chunked_triton` (CUDA); `trl_logits` = `selective_log_softmax`.
Every method computes d/d(inputs) of sum(g * logp) for a fixed random g. Reported: the median time of
`--repeats` runs after `--warmup`, and the peak memory above what the inputs already hold. On CUDA
that is `max_memory_allocated`; on a CPU it is the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after the inputs are built) minus its resident set at that moment: what the OS
had to provide, page granularity included; the workers run with MALLOC_MMAP_THRESHOLD_=1048576 so that
glibc returns freed buffers of 1 MiB and more at once instead of keeping them in its heap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.fused_loss import fused_token_loss
from models.logprobs import fused_token_logprobs, token_logprobs, triton_available

GROUPS = {
    "hidden": ["naive", "fused", "fused_loss", "fused_triton", "fused_loss_triton", "trl"],
    "logits": ["naive_logits", "chunked", "chunked_triton", "trl_logits"],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def trl_selective_log_softmax():
    """TRL's selective_log_softmax, or None when trl is not installed."""
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:
        return None
    return selective_log_softmax


def naive_logprobs(logits, tokens):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def weighted_sum(logp_fn):
    """fn(inputs, tokens, g) -> (sum(g * logp), logp) from a method that returns logp [B, T]."""

    def fn(inputs, tokens, upstream):
        logp = logp_fn(inputs, tokens)
        return (logp * upstream).sum(), logp

    return fn


def method_fn(name: str):
    """(group, fn(inputs, tokens, g) -> (sum(g * logp), logp [B, T])) of one method."""
    group, logp_fn = _logp_fn(name)
    if logp_fn is None:  # the loss itself is fused
        backend = "triton" if name.endswith("triton") else "torch"

        def fused_loss(inputs, tokens, upstream):
            flat_g = upstream.reshape(-1)
            loss, logp, _ = fused_token_loss(
                inputs[0], inputs[1], tokens, lambda lp, ent, pos: flat_g[pos] * lp, backend=backend
            )
            return loss, logp

        return group, fused_loss
    return group, weighted_sum(logp_fn)


def _logp_fn(name: str):
    if name == "naive":
        return "hidden", lambda x, t: naive_logprobs(x[0] @ x[1].T, t)
    if name in ("fused", "fused_triton"):
        backend = "triton" if name == "fused_triton" else "torch"
        return "hidden", lambda x, t: fused_token_logprobs(x[0], x[1], t, backend=backend)[0]
    if name in ("fused_loss", "fused_loss_triton"):
        return "hidden", None
    if name == "trl":
        sls = trl_selective_log_softmax()
        return "hidden", lambda x, t: sls(x[0] @ x[1].T, t)
    if name == "naive_logits":
        return "logits", lambda x, t: naive_logprobs(x[0], t)
    if name in ("chunked", "chunked_triton"):
        backend = "triton" if name == "chunked_triton" else "torch"
        return "logits", lambda x, t: token_logprobs(x[0], t, backend=backend)[0]
    if name == "trl_logits":
        sls = trl_selective_log_softmax()
        return "logits", lambda x, t: sls(x[0], t)
    raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(m for g in GROUPS.values() for m in g)}")


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak bytes above the level at `reset()`: CUDA allocator counters, or the process's VmHWM on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
            self.base = resident_kib("VmRSS") * 1024

    def peak_extra(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        return resident_kib("VmHWM") * 1024 - self.base


def worker(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    group, fn = method_fn(args.worker)
    gen = torch.Generator().manual_seed(0)
    B, T, V, H = args.batch, args.seq, args.vocab, args.hidden
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5 * 2  # logits of std ~2
    tokens = torch.randint(0, V, (B, T), generator=gen).to(device)
    upstream = torch.randn(B, T, generator=gen).to(device)
    if group == "hidden":
        inputs = [hidden.to(device, dtype).requires_grad_(True), weight.to(device, dtype).requires_grad_(True)]
    else:
        inputs = [(hidden @ weight.T).to(device, dtype).requires_grad_(True)]
    del hidden, weight

    def run():
        objective, logp = fn(inputs, tokens, upstream)
        grads = torch.autograd.grad(objective, inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return logp.detach(), grads

    memory = PeakMemory(device)
    memory.reset()
    times, cpu_times = [], []
    for i in range(args.warmup + args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        logp, grads = run()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        checksum = float(logp.double().sum())
        del logp, grads
    return {
        "method": args.worker,
        "group": group,
        "median_s": statistics.median(times),
        "times_s": times,
        "median_cpu_s": statistics.median(cpu_times),
        "peak_extra_bytes": memory.peak_extra(),
        "checksum": checksum,
    }


def available(method: str, device: str) -> str | None:
    """Why `method` cannot run here, or None."""
    if "triton" in method and (device != "cuda" or not triton_available()):
        return "Triton kernels are benchmarked on CUDA only"
    if method.startswith("trl") and trl_selective_log_softmax() is None:
        return "trl is not installed (pip install -r requirements-bench.txt)"
    return None


def table(results: list[dict], group: str, cuda: bool) -> list[str]:
    """Ratios of CPU time on a CPU (steady on a shared machine), of wall time on CUDA (kernels run async)."""
    rows = [r for r in results if r["group"] == group]
    base = next((r for r in rows if r["method"] in ("naive", "naive_logits")), None)
    key = "median_s" if cuda else "median_cpu_s"
    lines = [
        "| method | median fwd+bwd, wall (s) | CPU (s) | time / naive | peak extra memory (MiB) | memory / naive |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t_ratio = r[key] / base[key] if base else float("nan")
        m_ratio = r["peak_extra_bytes"] / base["peak_extra_bytes"] if base else float("nan")
        lines.append(
            f"| {r['method']} | {r['median_s']:.3f} | {r['median_cpu_s']:.3f} | {t_ratio:.2f} | "
            f"{r['peak_extra_bytes'] / 2**20:.0f} | {m_ratio:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method that can run here")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one method, in this process
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    methods = args.methods or [m for g in GROUPS.values() for m in g]
    results, skipped = [], []
    passthrough = [
        f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "vocab", "hidden", "dtype", "device", "repeats", "warmup")
    ]
    for method in methods:
        method_fn(method)  # an unknown name fails here, naming the valid ones
        reason = available(method, args.device)
        if reason:
            skipped.append(f"- {method}: skipped, {reason}")
            continue
        print(f"[{method}] running in its own process ...", file=sys.stderr, flush=True)
        # a fixed glibc mmap threshold: freed buffers of 1 MiB and more go back to the OS at once, so the
        # resident set follows live memory instead of glibc's adaptive heap (the same for every method)
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576")}
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", method, *passthrough],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    threads = os.environ.get("OMP_NUM_THREADS", "torch default")
    lines = [
        (
            f"B={args.batch}, T={args.seq}, V={args.vocab}, H={args.hidden}, {args.dtype}, {device_name}, "
            f"OMP_NUM_THREADS={threads}, torch {torch.__version__}; median of {args.repeats} after {args.warmup} "
            "warm-up; each method in a fresh process"
        ),
        "",
    ]
    for group, title in (("hidden", "From hidden states (lm_head matmul included)"), ("logits", "From given logits")):
        if any(r["group"] == group for r in results):
            lines += [f"**{title}**", "", *table(results, group, args.device == "cuda"), ""]
    lines += skipped
    sums = {r["method"]: r["checksum"] for r in results}
    lines.append("time / naive: ratio of " + ("wall" if args.device == "cuda" else "CPU") + " medians")
    lines.append(
        "checksums (sum of logp, equal up to rounding across methods): "
        + ", ".join(f"{k} {v:.2f}" for k, v in sums.items())
    )
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
