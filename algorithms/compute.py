"""Compute accounting: how many tokens each model forwards and backwards in an RL step, and what that costs.

The point is a fair PPO-vs-GRPO comparison "at the same cost": the two algorithms run different model
sets (PPO a critic, GRPO none; either a reference and maybe a learned reward model), so the generated
token budget alone does not say what a step costs. Counts are of real (unpadded) tokens -- what a
padding-free implementation would process -- and FLOPs use the usual dense-transformer estimate
(Kaplan et al. 2020): 2 * params per forward token, 4 * params per backward token (attention's
quadratic term is left out; at these lengths it is small).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from algorithms.rollout import Rollout

MODELS = ("actor", "reference", "critic", "reward_model")


def num_params(model: torch.nn.Module | None) -> int:
    return 0 if model is None else sum(p.numel() for p in model.parameters())


@dataclass
class StepCompute:
    """Token counts of one RL step, per model."""

    forward: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODELS, 0.0))
    backward: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODELS, 0.0))

    def flops(self, params: dict[str, int]) -> float:
        return sum(2.0 * params.get(m, 0) * self.forward[m] + 4.0 * params.get(m, 0) * self.backward[m] for m in MODELS)

    def metrics(self, params: dict[str, int]) -> dict[str, float]:
        out = {f"compute/{m}_forward_tokens": self.forward[m] for m in MODELS}
        out.update({f"compute/{m}_backward_tokens": self.backward[m] for m in ("actor", "critic")})
        out["compute/flops"] = self.flops(params)
        return out


def model_params(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None = None,
    critic: torch.nn.Module | None = None,
    reward_fn=None,
) -> dict[str, int]:
    """Parameter count per model of an RL algorithm (0 = the model is not used)."""
    reward_model = sum(reward_fn.model_params().values()) if hasattr(reward_fn, "model_params") else 0
    return {
        "actor": num_params(policy),
        "reference": num_params(reference),
        "critic": num_params(critic),
        "reward_model": reward_model,
    }


def step_compute_metrics(
    rollout: Rollout, reward_model_tokens: float, params: dict[str, int], epochs: int, old_logp_pass: bool
) -> dict[str, float]:
    """Every accounting metric of one RL step: token counts per model, FLOPs, prompt and trained tokens."""
    compute = rl_step_compute(
        rollout,
        epochs=epochs,
        old_logp_pass=old_logp_pass,
        reference=params["reference"] > 0,
        critic=params["critic"] > 0,
        reward_model_tokens=reward_model_tokens,
    )
    return {**compute.metrics(params), **step_token_metrics(rollout, epochs)}


def rl_step_compute(
    rollout: Rollout, *, epochs: int, old_logp_pass: bool, reference: bool, critic: bool, reward_model_tokens: float
) -> StepCompute:
    """Forward/backward tokens of one step that trains on `rollout` for `epochs` passes.

    Generation forwards every prompt token once (the prefill) and every generated token once (the KV
    cache makes decoding one token per forward); each later pass over the batch (old log-probs,
    reference, critic values, training) forwards prompt + completion tokens.
    """
    prompt = float(rollout.prompt_mask.sum())
    generated = float(rollout.completion_mask.sum())
    sequence = prompt + generated
    c = StepCompute()
    c.forward["actor"] = prompt + generated + epochs * sequence + (sequence if old_logp_pass else 0.0)
    c.backward["actor"] = epochs * sequence
    if reference:
        c.forward["reference"] = sequence
    if critic:  # old values, then the training passes
        c.forward["critic"] = sequence + epochs * sequence
        c.backward["critic"] = epochs * sequence
    c.forward["reward_model"] = float(reward_model_tokens)
    return c


def step_token_metrics(rollout: Rollout, epochs: int) -> dict[str, float]:
    """Prompt tokens and trained tokens (completion tokens in the loss, times the passes over them)."""
    return {
        "tokens/prompt": float(rollout.prompt_mask.sum()),
        "tokens/trained": epochs * float(rollout.completion_mask.sum()),
    }


def add_discarded_generation(
    metrics: dict[str, float], prompt_tokens: float, generated_tokens: float, actor_params: int
) -> None:
    """Add to a step's metrics the samples it generated but did not train on (dynamic sampling's dropped
    groups): their generated tokens, and the prefill and decoding forwards of the actor, so that runs are
    compared at the tokens they really generated."""
    if not prompt_tokens and not generated_tokens:
        return
    metrics["tokens/generated"] = metrics.get("tokens/generated", 0.0) + generated_tokens
    metrics["compute/actor_forward_tokens"] = (
        metrics.get("compute/actor_forward_tokens", 0.0) + prompt_tokens + generated_tokens
    )
    metrics["compute/flops"] = metrics.get("compute/flops", 0.0) + 2.0 * actor_params * (
        prompt_tokens + generated_tokens
    )
