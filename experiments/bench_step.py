"""Time of one RL step on the embedded SmolLM2-135M-Instruct: this project's GRPO against TRL's GRPOTrainer,
and this project's PPO against its GRPO at equal sequences.

    OMP_NUM_THREADS=1 python experiments/bench_step.py            # 1 warm-up + 3 measured steps each
    OMP_NUM_THREADS=1 python experiments/bench_step.py --impl ours --steps 5
    OMP_NUM_THREADS=1 python experiments/bench_step.py --impl ours ours-ppo   # PPO / GRPO

Same settings for both: P=2 prompts x G=4 generations, 64 new tokens, temperature 1, top_p 1, beta 0.04
(k3 KL in the loss), mu=1, one optimiser step per RL step (minibatch = micro-batch = 8), lr 5e-5,
loss_type grpo, group-scaled rewards, fp32 on the CPU, no gradient checkpointing, the `medical` reward,
the same prompts in the same order (this project's seeded sampler, fed to TRL unshuffled). Each
implementation runs in its own process. TRL runs only when `trl` is importable (requirements-bench.txt).
`ours-ppo` is this project's PPO on the same prompts, P x G, tokens, beta, mu and minibatch, with its own
estimator (critic + GAE, the KL in the reward: its defaults); its `ref` phase also holds the critic's
forward for the old values.

Phases: ours from its own PhaseTimer; TRL's by timing its methods on the trainer instance
(`_generate`, `_calculate_rewards`, `_generate_and_score_completions`), the step from a callback:
generate = sampling + decoding; score = reward functions; ref = the rest of TRL's generate-and-score
(reference log-probs, advantages, bookkeeping); train = forward + backward + optimiser step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("generate", "score", "ref", "train")


def settings_overrides(args, algo: str = "grpo") -> list[str]:
    grpo = ["algo.loss_type=grpo", "algo.scale_rewards=group", "algo.kl_estimator=k3"] if algo == "grpo" else []
    return [
        f"algo={algo}",
        f"algo.prompts_per_step={args.prompts}",
        f"algo.group_size={args.generations}",
        f"algo.max_new_tokens={args.max_new_tokens}",
        f"algo.beta={args.beta}",
        "algo.num_iterations=1",
        f"algo.minibatch_size={args.prompts * args.generations}",
        f"algo.micro_batch_size={args.prompts * args.generations}",
        "algo.temperature=1.0",
        "algo.top_p=1.0",
        *grpo,
        "model=smollm2_135m",
        "model.dtype=float32",
        f"trainer.threads={args.threads}",
        "trainer.device=cpu",
        "trainer.lr=5e-5",
        "logger.mode=disabled",
        f"seed={args.seed}",
        *args.ours_override,
    ]


def build_common(args, algo: str = "grpo"):
    """(cfg, tokenizer, policy, reward_fn, batches): the pieces every implementation shares."""
    import torch

    from conf.schema import compose_config
    from data.loading import PromptSampler
    from models.loading import load_causal_lm, load_tokenizer
    from rewards import build_reward
    from rewards.reward_model import reward_extras
    from run import load_data, seed_everything

    cfg = compose_config(settings_overrides(args, algo))
    torch.set_num_threads(args.threads)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    policy = load_causal_lm(cfg.model, tokenizer)
    train_rows, _, _ = load_data(cfg, tokenizer)
    reward_fn = build_reward(cfg.reward, extra=reward_extras(cfg.reward, torch.device("cpu")))
    sampler = PromptSampler(train_rows, args.prompts, seed=cfg.seed)
    batches = [sampler.next_batch() for _ in range(args.warmup + args.steps)]
    return cfg, tokenizer, policy, reward_fn, batches


def run_ours(args, algo: str = "grpo") -> list[dict[str, float]]:
    from conf.registry import get_stage
    from data.loading import Batch
    from run import seed_everything
    from training.loop import StageContext

    cfg, tokenizer, policy, reward_fn, batches = build_common(args, algo)
    ctx = StageContext(
        cfg,
        ROOT,
        policy=policy,
        tokenizer=tokenizer,
        reward_fn=reward_fn,
        train_rows=batches[0],
        generator=seed_everything(cfg.seed),
    )
    algo = get_stage(cfg.algo.name).build(ctx).algorithm  # what run.py builds: reference, AdamW
    steps = []
    for rows in batches:
        start, cpu_start = time.perf_counter(), time.process_time()
        metrics = algo.step(Batch(rows)).metrics
        step = {"total": time.perf_counter() - start, "cpu_total": time.process_time() - cpu_start}
        for prefix, out in (("time/", ""), ("cpu_time/", "cpu_")):
            step |= {
                f"{out}generate": metrics.get(f"{prefix}generate", 0.0),
                f"{out}score": metrics.get(f"{prefix}score", 0.0),
                f"{out}ref": sum(metrics.get(f"{prefix}{k}", 0.0) for k in ("reference", "old_logp", "critic")),
                f"{out}train": metrics.get(f"{prefix}train", 0.0),
            }
        steps.append(step | {"reward": metrics["reward/total_mean"]})
        print(
            f"[ours {algo}] step {len(steps)}: {step['total']:.2f} s wall, {step['cpu_total']:.2f} s CPU",
            file=sys.stderr,
            flush=True,
        )
    return steps


def run_trl(args) -> list[dict[str, float]]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    _cfg, tokenizer, policy, reward_fn, batches = build_common(args)
    rows = [row for batch in batches for row in batch]
    columns = sorted({k for row in rows for k in row if isinstance(row[k], (str, int, float, type(None)))})
    dataset = Dataset.from_list([{k: row.get(k) for k in columns} for row in rows])

    def medical_reward(prompts, completions, **cols):
        """The project's combined reward on TRL's call convention (dataset columns as keyword lists)."""
        batch_rows = [
            {k: cols[k][i] for k in columns if k in cols} | {"prompt": prompts[i]} for i in range(len(prompts))
        ]
        return reward_fn(prompts, completions, batch_rows).total.tolist()

    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_step_trl"
    trl_args = GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=args.prompts * args.generations,
        gradient_accumulation_steps=1,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        num_iterations=1,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        max_steps=args.warmup + args.steps,
        shuffle_dataset=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=policy, reward_funcs=medical_reward, args=trl_args, train_dataset=dataset, processing_class=tokenizer
    )
    seconds: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
                seconds["cpu" + name] = seconds.get("cpu" + name, 0.0) + time.process_time() - cpu_start

        return wrapper

    # instance attributes shadow the methods, so TRL's own calls go through the timers
    for name in ("_generate", "_calculate_rewards", "_generate_and_score_completions"):
        setattr(trainer, name, timed(name, getattr(trainer, name)))
    steps = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            seconds.clear()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            step = {"total": time.perf_counter() - self.start, "cpu_total": time.process_time() - self.cpu_start}
            for out in ("", "cpu_"):
                key = "cpu" if out else ""
                gen, score = seconds.get(key + "_generate", 0.0), seconds.get(key + "_calculate_rewards", 0.0)
                prep = seconds.get(key + "_generate_and_score_completions", 0.0)
                step |= {
                    f"{out}generate": gen,
                    f"{out}score": score,
                    f"{out}ref": prep - gen - score,
                    f"{out}train": step[f"{out}total"] - prep,
                }
            steps.append(step)
            print(
                f"[trl] step {len(steps)}: {step['total']:.2f} s wall, {step['cpu_total']:.2f} s CPU",
                file=sys.stderr,
                flush=True,
            )

    trainer.add_callback(StepTimer())
    trainer.train()
    return steps


def summarise(steps: list[dict[str, float]], warmup: int) -> dict:
    measured = steps[warmup:]
    keys = [prefix + key for prefix in ("", "cpu_") for key in ("total", *PHASES)]
    return {key: statistics.median(s[key] for s in measured) for key in keys} | {"n": len(measured)}


def trl_importable() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", nargs="*", choices=["ours", "trl", "ours-ppo"], default=["ours", "trl"])
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument(
        "--ours-override",
        nargs="*",
        default=[],
        help="extra Hydra overrides for this project's side, e.g. algo.fused_loss=false",
    )
    parser.add_argument("--worker", choices=["ours", "trl", "ours-ppo"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        steps = {"ours": run_ours, "ours-ppo": lambda a: run_ours(a, "ppo"), "trl": run_trl}[args.worker](args)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        print(json.dumps({"steps": steps, "summary": summarise(steps, args.warmup), "peak_rss_gib": peak_rss}))
        return

    results, notes = {}, []
    for impl in args.impl:
        if impl == "trl" and not trl_importable():
            notes.append("TRL: not run, trl is not importable (pip install -r requirements-bench.txt)")
            continue
        forward = [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("steps", "warmup", "prompts", "generations", "max_new_tokens", "beta", "threads", "seed")
        ]
        print(f"[{impl}] running in its own process ...", file=sys.stderr, flush=True)
        if args.ours_override:
            forward += ["--ours-override", *args.ours_override]
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", impl, *forward], capture_output=True, text=True, check=False
        )  # a failure is raised below, with the worker's stderr
        if proc.returncode != 0:
            raise RuntimeError(f"{impl} failed:\n{proc.stderr[-4000:]}")
        results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    lines = [
        f"RL step, embedded SmolLM2-135M-Instruct, fp32 CPU ({os.cpu_count()} cores, "
        f"torch threads {args.threads}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"torch {torch.__version__}): {args.prompts} prompts x {args.generations} generations, "
        f"{args.max_new_tokens} new tokens, beta {args.beta}, mu=1; median of {args.steps} steps after "
        f"{args.warmup} warm-up"
        + (f"; ours with {' '.join(args.ours_override)}" if args.ours_override else "")
        + ". Wall seconds, and CPU seconds of the process (steadier on a shared CPU)",
        "",
        "| | step wall (s) | step CPU (s) | generate | score | ref | train | peak RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for impl, res in results.items():
        s = res["summary"]
        phases = " | ".join(f"{s[p]:.2f} / {s['cpu_' + p]:.2f}" for p in PHASES)
        lines.append(f"| {impl} | {s['total']:.2f} | {s['cpu_total']:.2f} | {phases} | {res['peak_rss_gib']:.2f} |")
    lines.append("(phases: wall / CPU seconds)")
    if "ours" in results and "trl" in results:
        ours, trl = results["ours"]["summary"], results["trl"]["summary"]
        lines += [
            "",
            f"ours / TRL step time: {ours['total'] / trl['total']:.2f} wall, "
            f"{ours['cpu_total'] / trl['cpu_total']:.2f} CPU",
        ]
    if "ours" in results and "ours-ppo" in results:
        grpo, ppo = results["ours"]["summary"], results["ours-ppo"]["summary"]
        lines += [
            "",
            f"our PPO / our GRPO step time (equal sequences): {ppo['total'] / grpo['total']:.2f} wall, "
            f"{ppo['cpu_total'] / grpo['cpu_total']:.2f} CPU",
        ]
    lines += [""] + notes if notes else []
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
