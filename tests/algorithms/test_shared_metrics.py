"""A shared metric means one thing in every algorithm: GRPO, PPO, RLOO and REINFORCE++ each log every metric of
algorithms.metrics.SHARED_METRICS, and the advantages and the KL from the very tensors their update trained on."""

from __future__ import annotations

import math

import pytest
import torch

import algorithms.policy_gradient as policy_gradient
import algorithms.ppo as ppo
from algorithms.grpo import GRPOConfig, build_grpo
from algorithms.metrics import SHARED_METRICS
from algorithms.ppo import PPOConfig, build_ppo
from algorithms.reinforce_pp import ReinforcePPConfig, build_reinforce_pp
from algorithms.rloo import RLOOConfig, build_rloo
from tests.conftest import say_rows, stage_context

# logged by the loop around a step (training.loop) or by the held-out eval, not by the step itself
LOOP_KEYS = {"time/step", "lr", "skipped_steps", "memory/peak_rss_mb", "eval/<metric>", "compute/pass_<stat>"}
# logged only under data parallelism (tests/parallel/test_distributed.py checks them under torchrun)
DISTRIBUTED_KEYS = {"ranks/load_spread"}
EXAMPLES = {"<name>": "letter_e", "<model>": "actor", "<phase>": "generate", "<stat>": "kl"}
SMALL = dict(
    prompts_per_step=2, group_size=2, minibatch_size=4, micro_batch_size=4, max_new_tokens=6, beta=0.1,
    recompute_old_logp=True,  # the sampler's log-probs kept beside the trainer's: rollout_corr/* is logged
)  # fmt: skip
ALGORITHMS = {
    "grpo": (build_grpo, GRPOConfig),
    "ppo": (build_ppo, PPOConfig),
    "rloo": (build_rloo, RLOOConfig),
    "reinforce_pp": (build_reinforce_pp, ReinforcePPConfig),
}


def step_keys() -> list[str]:
    keys = []
    for name in SHARED_METRICS:
        if name in LOOP_KEYS | DISTRIBUTED_KEYS:
            continue
        key = name
        for pattern, example in EXAMPLES.items():
            key = key.replace(pattern, example)
        keys.append(key)
    return keys


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
@pytest.mark.parametrize("whiten", [False, True])
def test_every_algorithm_logs_the_shared_metrics_from_its_update(
    algo, whiten, tiny_model, tokenizer, letter_e_reward, monkeypatch
):
    builder, config = ALGORITHMS[algo]
    options = {} if algo == "grpo" else {"whiten_advantages": whiten}
    if algo == "grpo" and whiten:
        options = {"scale_rewards": "batch"}
    cfg = config(**SMALL, **options)
    seen: list[dict[str, torch.Tensor]] = []
    real_update = policy_gradient.minibatch_update

    def recording_update(tensors, *args, **kwargs):
        seen.append({k: v.clone() for k, v in tensors.items()})
        return real_update(tensors, *args, **kwargs)

    monkeypatch.setattr(policy_gradient, "minibatch_update", recording_update)
    monkeypatch.setattr(ppo, "minibatch_update", recording_update)
    torch.manual_seed(0)
    ctx = stage_context(tiny_model, tokenizer, cfg, letter_e_reward, train_rows=say_rows(tokenizer))
    built = builder(ctx)
    metrics = built.algorithm.step(built.sampler.draw()).metrics

    missing = [key for key in step_keys() if key not in metrics]
    assert not missing, f"{algo} does not log {missing}"
    assert all(math.isfinite(metrics[key]) for key in step_keys())
    (tensors,) = seen  # one update per step
    mask = tensors["completion_mask"].float()
    advantages = tensors["advantages"]
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(mask)
    # the definition, written out: over the real completion tokens of what the loss used
    real = advantages[mask.bool()]
    assert metrics["advantages/mean"] == pytest.approx(float(real.mean()), abs=1e-6)
    assert metrics["advantages/std"] == pytest.approx(float(real.std()), abs=1e-6)
    assert metrics["advantages/abs_mean"] == pytest.approx(float(real.abs().mean()), abs=1e-6)
    k1 = (tensors["old_logp"] - tensors["ref_logp"])[mask.bool()]
    assert metrics["kl"] == pytest.approx(float(k1.mean()), abs=1e-6)
    per_sequence = ((tensors["old_logp"] - tensors["ref_logp"]) * mask).sum(-1).mean()
    assert metrics["kl/sequence"] == pytest.approx(float(per_sequence), abs=1e-5)
