"""Padded vs packed (padding-free) decoder passes of a GRPO step, in one run, on a synthetic long-tailed workload.

    python experiments/bench_train.py --model embedded                 # SmolLM2-135M, CPU, one thread
    python experiments/bench_train.py --model embedded --device cuda   # the GPU check
    python experiments/bench_train.py --model tiny                     # a tiny random Llama
    python experiments/bench_train.py --quick                          # a few seconds: tiny model, short lengths

The workload has the target setting's shape: P prompts of 80-250 random token ids, G completions each (group-
contiguous, the G sharing their prompt), completion lengths long-tailed (lognormal, drawn by stratified quantiles
so that about `--truncated-frac` of them reach `--max-new-tokens` and are truncated there, the others end in EOS),
seeded. The old log-probs are the policy's own, from one padded pass; the rewards are seeded normals turned into
GRPO's group advantages; beta = 0.04 (the reference's log-probs enter the loss).

Two modes run on the same tensors and the same weights, in the same process:
- padded: `MicroBatch(--micro-batch-size)`, no packing (prompts left-padded, completions right-padded; the padded
  path's shared prefill runs each distinct prompt of a micro-batch once);
- packed: `MicroBatch(.., tokens=--budget)` inside `models.forward.packed_passes(--budget)`: micro-batches balanced
  by real tokens, each decoder pass run as packed rows of at most the budget, attention unit by unit
  (models.unit_attention);
- with --dense-mask-too, packed again with SDPA over whole rows under the layout's dense mask.
Each mode runs
1. the reference phase: `batched_logprobs(reference, rollout, micro_batch, temperature)` (no grad);
2. the train phase: one `minibatch_update` (one epoch, one minibatch = the whole batch, shuffled by a generator
   re-seeded each time) with GRPO's loss function (`policy_objective` on GRPOConfig's defaults: loss_type grpo,
   clip 0.2, fused loss, beta 0.04), the actor's AdamW (`training.update.actor_target`, the trainer's defaults:
   gradients clipped to norm 1.0) at lr = 0: the update does all its arithmetic but leaves the weights as they are
   (checked at the end), so every repeat and both modes do the same work on the same weights.
First an untimed run per mode (warm-up) gives the exactness figures (packed vs padded reference log-probs over
real tokens; the two train phases' gradients, taken after clipping, relative to the gradient's scale), the tokens
the decoder passes forwarded (`models.forward.tally_passes`) and the bytes of activations autograd saved for the
backward (see below); then `--repeats` timed runs, the modes interleaved (padded, packed, padded, ...), and the
median of each is reported ("ref+train" is the median of the per-repeat sums). The ratios packed / padded are
taken within this one run, on the same machine state.

Memory: "saved activation MiB" is the peak, over the train phase, of the bytes of the tensors autograd keeps for
the backward (`torch.autograd.graph.saved_tensors_hooks`, each storage counted once, parameters left out): a
deterministic proxy for the activation memory. It leaves out what the fused loss holds outside autograd (its
precomputed lm_head gradients: a [V, H] matrix and [real completion tokens, H], the same in both modes).
"peak MiB": on CUDA `torch.cuda.max_memory_allocated` above the phase's start; on a CPU the process's peak
resident set above its resident set at the phase's start (VmHWM, reset through /proc/self/clear_refs): what the
OS had to provide, measured in one more, untimed train phase per mode after the timed repeats, with glibc set to
mmap buffers of 1 MiB and more and its free heap trimmed before the phase, so that a phase does not live on memory
an earlier one freed (the timed repeats keep glibc's defaults: its page faults would slow them down). On CUDA the
maximum over the timed repeats.

Times: wall seconds and the process's CPU seconds. On a CPU the time target is judged on CPU seconds (steadier than
wall time on a shared machine: other processes' load stretches the wall time, not this process's CPU time); on
CUDA on wall seconds (the kernels run asynchronously).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms.batch_stats import sharded_group_advantages
from algorithms.common import batched_logprobs, rollout_tensors
from algorithms.grpo import GRPOConfig
from algorithms.objective import policy_micro_loss
from algorithms.rollout import Rollout
from conf.schema import ModelConfig, TrainerConfig
from models.forward import packed_passes, tally_passes
from models.loading import load_causal_lm, random_llama
from models.scale import reference_model
from models.shapes import SMOLLM2_SHAPE, TINY_LLAMA
from training.update import MicroBatch, MicroShare, actor_target, minibatch_update

TINY = TINY_LLAMA  # the tests' tiny Llama, with the embedded tokenizer's vocabulary
TINY_VOCAB = 49152
# workload knobs: (default, --quick default)
KNOBS = {
    "prompts": (4, 2),
    "group_size": (4, 4),
    "max_new_tokens": (256, 48),
    "prompt_min": (80, 16),
    "prompt_max": (250, 40),
    "budget": (2048, 256),
    "micro_batch_size": (8, 4),
    "repeats": (3, 1),
}
TOKENS_TARGET = 1.05  # packed: forwarded tokens <= this x real tokens
TIME_TARGET = 0.6  # packed: reference + train time <= this x padded
EOS_ID, PAD_ID = 2, 0


# ---- the workload ---------------------------------------------------------------------------------------------
@dataclass
class Workload:
    rollout: Rollout
    prompt_lens: list[int]  # [P]
    completion_lens: list[int]  # [N]
    real_tokens: int  # real prompt + completion tokens summed over the N sequences (a prompt G times)
    real_distinct: int  # the same with each distinct prompt once

    def summary(self) -> dict[str, float]:
        lens = self.completion_lens
        return {
            "sequences": len(lens),
            "prompt_len_min": min(self.prompt_lens),
            "prompt_len_max": max(self.prompt_lens),
            "completion_len_mean": statistics.fmean(lens),
            "completion_len_median": statistics.median(lens),
            "completion_len_max": max(lens),
            "truncated_frac": float(self.rollout.truncated.float().mean()),
            "real_tokens": self.real_tokens,
            "real_tokens_prompts_once": self.real_distinct,
            "padded_grid_tokens": self.rollout.input_ids.numel(),
        }


def stratified_uniform(n: int, gen: torch.Generator) -> Tensor:
    """[n] uniforms, one in each of n equal strata, shuffled: the drawn distribution's shape at any n."""
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=gen, dtype=torch.float64)) / n
    return u[torch.randperm(n, generator=gen)]


def completion_lengths(n: int, cap: int, truncated_frac: float, sigma: float, gen: torch.Generator) -> Tensor:
    """[n] lognormal lengths (log-sd `sigma`) whose (1 - truncated_frac) quantile is `cap`, clipped to [1, cap]."""
    mu = math.log(cap) - sigma * float(torch.special.ndtri(torch.tensor(1.0 - truncated_frac, dtype=torch.float64)))
    z = torch.special.ndtri(stratified_uniform(n, gen))
    return (mu + sigma * z).exp().ceil().clamp(1, cap).long()


def synthetic_workload(
    prompts: int,
    group: int,
    max_new_tokens: int,
    prompt_min: int,
    prompt_max: int,
    vocab: int,
    truncated_frac: float,
    sigma: float,
    seed: int,
) -> Workload:
    """A GRPO batch of random ids laid out as `algorithms.rollout.generate_rollout` lays one out (log-probs 0)."""
    gen = torch.Generator().manual_seed(seed)
    n = prompts * group
    p_lens = torch.randint(prompt_min, prompt_max + 1, (prompts,), generator=gen).tolist()
    c_lens = completion_lengths(n, max_new_tokens, truncated_frac, sigma, gen)
    truncated = c_lens >= max_new_tokens
    tp, tc = max(p_lens), int(c_lens.max())
    prompt_ids = torch.full((n, tp), PAD_ID, dtype=torch.long)
    prompt_mask = torch.zeros(n, tp, dtype=torch.long)
    for p, length in enumerate(p_lens):
        ids = torch.randint(3, vocab, (length,), generator=gen)
        rows = slice(p * group, (p + 1) * group)
        prompt_ids[rows, tp - length :] = ids  # left-padded, the same prompt for the group's G sequences
        prompt_mask[rows, tp - length :] = 1
    completion_ids = torch.full((n, tc), PAD_ID, dtype=torch.long)
    completion_mask = torch.zeros(n, tc, dtype=torch.long)
    for b, length in enumerate(c_lens.tolist()):
        completion_ids[b, :length] = torch.randint(3, vocab, (length,), generator=gen)
        if not truncated[b]:
            completion_ids[b, length - 1] = EOS_ID  # stopped by EOS, which the mask includes
        completion_mask[b, :length] = 1
    rollout = Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logp=torch.zeros(n, tc),
        truncated=truncated,
        prompts=[""] * n,
        completions=[""] * n,
        rows=[{} for _ in range(n)],
    )
    real_tokens = sum(p_lens) * group + int(c_lens.sum())
    return Workload(rollout, p_lens, c_lens.tolist(), real_tokens, sum(p_lens) + int(c_lens.sum()))


def rollout_to(rollout: Rollout, device: torch.device) -> Rollout:
    tensors = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logp", "truncated")
    return Rollout(
        **{k: (getattr(rollout, k).to(device) if k in tensors else getattr(rollout, k)) for k in vars(rollout)}
    )


# ---- models ---------------------------------------------------------------------------------------------------
def load_policy(name: str, device: torch.device) -> torch.nn.Module:
    if name == "tiny":
        model = random_llama(ModelConfig(name="tiny_llama", **TINY), vocab_size=TINY_VOCAB, device=device)
    elif name == "smollm2_random":  # its shapes, random weights: where the weights cannot go (the GPU check)
        cfg = ModelConfig(name="smollm2_135m", source="random", tokenizer="embedded", **SMOLLM2_SHAPE)
        model = random_llama(cfg, vocab_size=TINY_VOCAB, device=device)
    else:  # the embedded SmolLM2-135M-Instruct (model=smollm2_135m), offline
        model = load_causal_lm(ModelConfig(), device=device)
    return model.eval()


# ---- measurement helpers --------------------------------------------------------------------------------------
def resident_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def glibc():
    """The C library when it is glibc (mallopt, malloc_trim), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


class PeakMemory:
    """Peak bytes above the level at `reset()`: CUDA allocator counters, or the process's VmHWM on a CPU
    (None where /proc/self/clear_refs cannot be written).

    On a CPU, glibc would serve a phase from memory an earlier phase freed but kept (its heap, its dynamic mmap
    threshold), so the second mode would show no growth: after `fix_allocator` buffers of 1 MiB and more are
    mmapped (freed at once, a fixed threshold: mallopt) and the free heap is handed back (malloc_trim) before each
    reset."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.base: int | None = None
        self.libc = None  # set by fix_allocator

    def fix_allocator(self) -> None:
        """On a CPU: mmap buffers of 1 MiB and more, trim before each reset (slower: only for the memory runs)."""
        if not self.cuda and self.libc is None:
            self.libc = glibc()
            if self.libc is not None:
                self.libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        if self.libc is not None:
            self.libc.malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
            self.base = resident_kib("VmRSS") * 1024
        except OSError:
            self.base = None

    def peak_extra(self) -> int | None:
        if self.base is None:
            return None
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        return resident_kib("VmHWM") * 1024 - self.base


class SavedActivations:
    """Live and peak bytes of the tensors autograd saves for the backward while the context is open, each storage
    counted once, the parameters' storages left out."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, saved references]
        self.now = self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.skip:
            return tensor
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        return _Saved(tensor, self, key)

    @staticmethod
    def unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


class _Saved:
    __slots__ = ("key", "owner", "tensor")

    def __init__(self, tensor: Tensor, owner: SavedActivations, key: int):
        self.tensor, self.owner, self.key = tensor, owner, key

    def __del__(self):
        self.owner.release(self.key)


class GradientComparison:
    """An optimiser step pre-hook: the first mode's gradients (after clipping) are kept, a later mode's compared."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.reference: list[Tensor | None] | None = None
        self.active: str | None = None  # None: record nothing; "keep" or "compare"
        self.result: dict[str, float] = {}

    def __call__(self, optimizer, args, kwargs) -> None:
        if self.active == "keep":
            self.reference = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        elif self.active == "compare":
            assert self.reference is not None
            diff_max = ref_max = diff_sq = ref_sq = 0.0
            for p, ref in zip(self.params, self.reference):
                if ref is None and p.grad is None:
                    continue
                g = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
                r = ref if ref is not None else torch.zeros_like(p)
                d = (g.double() - r.double()).abs()
                diff_max, ref_max = max(diff_max, float(d.max())), max(ref_max, float(r.abs().max()))
                diff_sq, ref_sq = diff_sq + float((d * d).sum()), ref_sq + float(r.double().pow(2).sum())
            self.result = {
                "grad_max_abs_diff": diff_max,
                "grad_max_abs": ref_max,
                "grad_max_abs_diff_rel": diff_max / max(ref_max, 1e-30),
                "grad_norm_diff_rel": math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-30),
            }


START = time.perf_counter()


def progress(message: str) -> None:
    """A progress line on stderr (a run on the embedded model takes minutes)."""
    print(f"[bench_train {time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Mode:
    name: str
    budget: int  # 0: padded
    micro_batch_size: int
    dense_mask: bool = False  # packed, sdpa over whole rows under the layout's mask (not unit by unit)
    runs: list[dict[str, float]] = field(default_factory=list)  # the timed repeats
    peak_bytes: int | None = None  # the train phase's peak memory (see the module's docstring)
    warmup: dict = field(default_factory=dict)  # tokens, saved activations, grad norm of the untimed run

    def micro_batch(self) -> MicroBatch:
        return MicroBatch(self.micro_batch_size, tokens=self.budget)


# ---- the two phases -------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.policy = load_policy(args.model, device)
        self.reference = reference_model(self.policy)  # a frozen copy, as GRPO's reference with beta > 0
        vocab = self.policy.config.vocab_size
        work = synthetic_workload(
            args.prompts,
            args.group_size,
            args.max_new_tokens,
            args.prompt_min,
            args.prompt_max,
            vocab,
            args.truncated_frac,
            args.sigma,
            args.seed,
        )
        self.work = work
        self.rollout = rollout_to(work.rollout, device)
        n = len(work.completion_lens)
        self.cfg = GRPOConfig(
            prompts_per_step=args.prompts,
            group_size=args.group_size,
            max_new_tokens=args.max_new_tokens,
            minibatch_size=n,
            micro_batch_size=args.micro_batch_size,
        )
        # the old log-probs: the policy's own, from one padded pass (the ratio starts at 1, as with mu = 1)
        self.rollout.logp = batched_logprobs(self.policy, self.rollout, MicroBatch(args.micro_batch_size), 1.0)
        self.tensors = rollout_tensors(self.rollout)
        rewards = torch.randn(n, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
        self.tensors["advantages"] = sharded_group_advantages(
            rewards, args.group_size, self.cfg.scale_rewards, self.cfg.advantage_eps
        )
        # the actor's AdamW with the trainer's defaults (max_grad_norm 1.0), at lr = 0: every step does AdamW's
        # arithmetic and leaves the weights as they are (weight decay is scaled by lr too)
        self.target, optimizer = actor_target(self.policy, TrainerConfig(), lr=0.0)
        self.params = self.target.params
        self.grads = GradientComparison(self.params)
        optimizer.register_step_pre_hook(self.grads)
        self.memory = PeakMemory(device)
        self.checksum = self.weights_checksum()

    def weights_checksum(self) -> float:
        with torch.no_grad():
            return sum(float(p.double().sum()) for p in self.params)

    def reference_phase(self, mode: Mode) -> tuple[Tensor, float, float, dict[str, float]]:
        """(reference log-probs [N, Tc], wall s, CPU s, the pass tally)."""
        with packed_passes(mode.budget, mode.dense_mask), tally_passes() as tally:
            synchronize(self.device)
            start, cpu = time.perf_counter(), time.process_time()
            logp = batched_logprobs(self.reference, self.rollout, mode.micro_batch(), self.cfg.temperature)
            synchronize(self.device)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return logp, wall, cpu, tally.metrics()

    def train_phase(self, mode: Mode, saved: SavedActivations | None = None) -> dict[str, float]:
        """One minibatch_update over the whole batch with GRPO's loss function (algorithms.policy_gradient's)."""
        cfg, policy = self.cfg, self.policy

        def loss_fn(micro: dict[str, Tensor], share: MicroShare):
            return policy_micro_loss(policy, micro, cfg, share, cfg.beta)  # GRPO's: the KL in the loss

        n = self.tensors["completion_mask"].shape[0]
        generator = torch.Generator().manual_seed(self.args.seed + 2)  # the same shuffle every time
        policy.train()
        with (
            packed_passes(mode.budget, mode.dense_mask),
            tally_passes() as tally,
            saved if saved is not None else nullcontext(),
        ):
            self.memory.reset()
            start, cpu = time.perf_counter(), time.process_time()
            stats = minibatch_update(self.tensors, loss_fn, [self.target], 1, n, mode.micro_batch(), generator)
            synchronize(self.device)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            peak = self.memory.peak_extra()
        policy.eval()
        assert stats["optimizer_steps"] == 1.0, stats
        return {
            "train_s": wall,
            "train_cpu_s": cpu,
            "peak_bytes": peak,
            "grad_norm": stats["grad_norm/actor"],
            "loss": stats["loss"],
            **{f"tally/{k}": v for k, v in tally.metrics().items()},
        }

    def warm_up(self, mode: Mode, first: bool, reference_logp: Tensor | None) -> Tensor:
        """The untimed run: tokens, saved activations, exactness against the first mode."""
        logp, _, _, ref_tally = self.reference_phase(mode)
        if first:  # both modes train on the first mode's reference log-probs: the same tensors, the same work
            self.tensors["ref_logp"] = logp
        saved = SavedActivations(self.params)
        self.grads.active = "keep" if first else "compare"
        train = self.train_phase(mode, saved)
        self.grads.active = None
        mask = self.rollout.completion_mask.bool()
        mode.warmup = {
            "reference_tally": ref_tally,
            "train_tally": {k.removeprefix("tally/"): v for k, v in train.items() if k.startswith("tally/")},
            "saved_activation_bytes": saved.peak,
            "grad_norm": train["grad_norm"],
            "loss": train["loss"],
        }
        if not first:
            assert reference_logp is not None
            mode.warmup["ref_logp_max_abs_diff"] = float((logp - reference_logp)[mask].abs().max())
            mode.warmup.update(self.grads.result)
        return logp

    def timed(self, mode: Mode) -> None:
        _, ref_s, ref_cpu, _ = self.reference_phase(mode)
        train = self.train_phase(mode)
        mode.runs.append(
            {
                "reference_s": ref_s,
                "reference_cpu_s": ref_cpu,
                "train_s": train["train_s"],
                "train_cpu_s": train["train_cpu_s"],
                "total_s": ref_s + train["train_s"],
                "total_cpu_s": ref_cpu + train["train_cpu_s"],
                "peak_bytes": train["peak_bytes"],
            }
        )


# ---- figures --------------------------------------------------------------------------------------------------
def mode_figures(mode: Mode, work: Workload) -> dict:
    """Medians over the timed repeats, the token ratios of the warm-up run."""
    ref, train = mode.warmup["reference_tally"], mode.warmup["train_tally"]
    forwarded = ref["compute/pass_forward_tokens"] + train["compute/pass_forward_tokens"]
    out = {
        "mode": mode.name,
        "budget": mode.budget,
        "micro_batch_size": mode.micro_batch_size if mode.budget == 0 else None,
        "forwarded_tokens_per_pass": forwarded / 2,
        "forwarded_per_real": forwarded / (2 * work.real_tokens),
        "forwarded_per_real_prompts_once": forwarded / (2 * work.real_distinct),
        "reference_forwarded_tokens": ref["compute/pass_forward_tokens"],
        "train_forwarded_tokens": train["compute/pass_forward_tokens"],
        "tally_real_tokens_per_pass": (ref["compute/pass_real_tokens"] + train["compute/pass_real_tokens"]) / 2,
        "saved_activation_bytes": mode.warmup["saved_activation_bytes"],
        "grad_norm": mode.warmup["grad_norm"],
        "loss": mode.warmup["loss"],
        "runs": mode.runs,
    }
    for key in ("reference_s", "train_s", "total_s", "reference_cpu_s", "train_cpu_s", "total_cpu_s"):
        out[key] = statistics.median(r[key] for r in mode.runs)
    out["peak_bytes"] = mode.peak_bytes
    for key in ("ref_logp_max_abs_diff", "grad_max_abs_diff", "grad_max_abs_diff_rel", "grad_norm_diff_rel"):
        if key in mode.warmup:
            out[key] = mode.warmup[key]
    return out


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(args, device: torch.device, work: Workload, figures: list[dict]) -> dict:
    padded, packed = figures[0], figures[1]
    time_key = "total_cpu_s" if device.type == "cpu" else "total_s"
    ratios = {
        "time_wall": packed["total_s"] / padded["total_s"],
        "time_cpu": packed["total_cpu_s"] / padded["total_cpu_s"],
        "reference_time_wall": packed["reference_s"] / padded["reference_s"],
        "train_time_wall": packed["train_s"] / padded["train_s"],
        "saved_activations": packed["saved_activation_bytes"] / max(padded["saved_activation_bytes"], 1),
        "peak_memory": (
            packed["peak_bytes"] / padded["peak_bytes"]
            if packed["peak_bytes"] is not None and padded["peak_bytes"]
            else None
        ),
        "forwarded_tokens": packed["forwarded_tokens_per_pass"] / padded["forwarded_tokens_per_pass"],
    }
    target_setting = args.model == "embedded" and device.type == "cpu" and args.threads == 1
    targets = {
        "tokens": {
            "figure": packed["forwarded_per_real_prompts_once"],
            "target": TOKENS_TARGET,
            "pass": packed["forwarded_per_real_prompts_once"] <= TOKENS_TARGET,
        },
        "time": {
            "figure": packed[time_key] / padded[time_key],
            "measure": time_key,
            "target": TIME_TARGET,
            "pass": packed[time_key] / padded[time_key] <= TIME_TARGET,
            "target_setting": target_setting,
        },
    }
    summary = work.summary()
    lines = [
        f"bench_train: model={args.model} device={device.type} threads={torch.get_num_threads()} "
        f"seed={args.seed} repeats={args.repeats} (median), torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs visible, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"workload: {args.prompts} prompts x G={args.group_size} = {summary['sequences']} sequences; prompts "
        f"{summary['prompt_len_min']}-{summary['prompt_len_max']} tokens; completions mean "
        f"{summary['completion_len_mean']:.1f}, median {summary['completion_len_median']:.0f}, max "
        f"{summary['completion_len_max']} (cap {args.max_new_tokens}), truncated {summary['truncated_frac']:.0%}; "
        f"real tokens {summary['real_tokens']} ({summary['real_tokens_prompts_once']} with each prompt once), "
        f"padded grid {summary['padded_grid_tokens']}",
        "",
        "| mode | fwd tokens/pass | fwd/real | fwd/real (prompts once) | reference s | train s | ref+train s "
        "| ref+train CPU s | saved activation MiB | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        name = f["mode"] + (f" (micro-batch {f['micro_batch_size']})" if f["budget"] == 0 else "")
        lines.append(
            f"| {name} | {f['forwarded_tokens_per_pass']:.0f} | {f['forwarded_per_real']:.3f} | "
            f"{f['forwarded_per_real_prompts_once']:.3f} | {f['reference_s']:.3f} | {f['train_s']:.3f} | "
            f"{f['total_s']:.3f} | {f['total_cpu_s']:.3f} | {mib(f['saved_activation_bytes'])} | "
            f"{mib(f['peak_bytes'])} |"
        )
    peak_ratio = "n/a" if ratios["peak_memory"] is None else f"{ratios['peak_memory']:.3f}"
    lines += [
        "",
        f"packed / padded: ref+train wall {ratios['time_wall']:.3f}, ref+train CPU {ratios['time_cpu']:.3f} "
        f"(reference {ratios['reference_time_wall']:.3f}, train {ratios['train_time_wall']:.3f} wall); saved "
        f"activations {ratios['saved_activations']:.3f}; peak memory {peak_ratio}; forwarded tokens "
        f"{ratios['forwarded_tokens']:.3f}",
        "fwd tokens/pass: mean over the reference and the train pass of the tokens the decoder ran (padding included);"
        " real: the sequences' prompt + completion tokens (a prompt once per sequence), or each distinct prompt once",
        "saved activation MiB: peak bytes autograd held for the backward in the train phase (storages once, "
        "parameters and the fused loss's own lm_head gradients left out); peak MiB: "
        + (
            "torch.cuda.max_memory_allocated above the phase start"
            if device.type == "cuda"
            else "peak resident set (VmHWM) above the phase start, in an untimed run per mode with glibc set to hand "
            "freed memory back (page-granular, allocator-dependent)"
        ),
        "",
        f"exactness: max |reference logp packed - padded| over real tokens {packed['ref_logp_max_abs_diff']:.3e}; "
        f"gradients (after clipping to 1.0) max |diff| {packed['grad_max_abs_diff']:.3e} = "
        f"{packed['grad_max_abs_diff_rel']:.3e} of max |grad|, ||diff|| / ||grad|| {packed['grad_norm_diff_rel']:.3e}; "
        f"grad norm before clipping padded {padded['grad_norm']:.6g}, packed {packed['grad_norm']:.6g}; "
        f"logged loss statistic (mean of the micro-batches' unweighted policy losses: depends on the partition, not an "
        f"exactness figure) padded {padded['loss']:.6g}, packed {packed['loss']:.6g}",
        "",
        f"target: forwarded tokens <= {TOKENS_TARGET}x real (packed, real with each distinct prompt once): "
        f"{targets['tokens']['figure']:.3f}x -> {verdict(targets['tokens']['pass'])}",
        f"target: reference + train time <= {TIME_TARGET}x padded (long-tailed workload, embedded model, CPU, one "
        f"thread): {targets['time']['figure']:.3f}x ({time_key}) -> {verdict(targets['time']['pass'])}"
        + (
            ""
            if target_setting
            else f"  [this run: {args.model} model, {device.type}, {args.threads} thread(s): not the target's setting]"
        ),
    ]
    for dense in figures[2:]:  # --dense-mask-too
        lines.append(
            f"{dense['mode']}: ref+train CPU {dense['total_cpu_s'] / padded['total_cpu_s']:.3f}x padded; packed "
            f"(unit attention) / dense mask {packed['total_cpu_s'] / dense['total_cpu_s']:.3f} (CPU), "
            f"{packed['total_s'] / dense['total_s']:.3f} (wall)"
        )
    print("\n".join(lines), flush=True)
    return {
        "args": vars(args),
        "device": device.type,
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "workload": summary,
        "modes": figures,
        "ratios": ratios,
        "targets": targets,
        "table": lines,
    }


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=("tiny", "embedded", "smollm2_random"),
        default=None,
        help="default tiny with --quick, else embedded; smollm2_random: its shapes, random weights",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="tiny model, few sequences, short lengths: seconds")
    for name, (default, quick) in KNOBS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {default} ({quick} with --quick)"
        )
    parser.add_argument("--truncated-frac", type=float, default=0.2, help="share of completions reaching the cap")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-sd of the completion lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dense-mask-too",
        action="store_true",
        help="a third mode: packed with SDPA over whole rows under the layout's mask (the attention before "
        "models.unit_attention), to measure what unit-by-unit attention saves",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.model is None:
        args.model = "tiny" if args.quick else "embedded"
    for name, (default, quick) in KNOBS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    bench = Bench(args, device)
    modes = [
        Mode("padded", 0, args.micro_batch_size),
        Mode(f"packed (budget {args.budget})", args.budget, args.micro_batch_size),
    ]
    if args.dense_mask_too:
        modes.append(Mode(f"packed, dense mask (budget {args.budget})", args.budget, args.micro_batch_size, True))
    progress(f"{args.model} model and workload ready; untimed warm-up runs")
    reference_logp = None
    for i, mode in enumerate(modes):
        logp = bench.warm_up(mode, first=i == 0, reference_logp=reference_logp)
        reference_logp = logp if i == 0 else reference_logp
        progress(f"warm-up {mode.name} done")
    for repeat in range(args.repeats):
        for mode in modes:  # interleaved: both modes see the same drift in the machine's load
            bench.timed(mode)
            run = mode.runs[-1]
            progress(
                f"repeat {repeat + 1} {mode.name}: reference {run['reference_s']:.2f} s, train {run['train_s']:.2f} s"
            )
    for mode in modes:
        if device.type == "cuda":
            peaks = [r["peak_bytes"] for r in mode.runs if r["peak_bytes"] is not None]
            mode.peak_bytes = max(peaks) if peaks else None
        else:  # a run of its own, the allocator set to hand memory back (PeakMemory.fix_allocator)
            bench.memory.fix_allocator()
            mode.peak_bytes = bench.train_phase(mode)["peak_bytes"]
    assert bench.weights_checksum() == bench.checksum, "the lr = 0 updates changed the weights"
    figures = [mode_figures(mode, bench.work) for mode in modes]
    out = report(args, device, bench.work, figures)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return out


if __name__ == "__main__":
    main()
