"""The learned reward: a trained `RewardModel` behind the reward-function signature.

Not in the registry -- it needs a trained model, which only the training code has:

    scorer = RewardModelScorer.from_path("outputs/reward_model/.../reward_model", device)
    reward_fn = build_reward(cfg.reward, extra={"reward_model": scorer})

`reward=reward_model reward.path=DIR` makes run.py do exactly that (see `reward_extras`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from conf.schema import ConfigError, RewardConfig
from models.heads import RewardModel, encode_texts


class RewardModelScorer:
    """fn(prompts, completions, **columns) -> list[float]: RM scores of prompt + completion, no grad."""

    def __init__(self, model: RewardModel, tokenizer, batch_size: int = 16):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.forward_tokens = 0  # real tokens scored so far (compute accounting)

    @classmethod
    def from_path(cls, path: str | Path, device: torch.device | str = "cpu", batch_size: int = 16) -> RewardModelScorer:
        """A scorer for the reward model saved in `path` (by algo=reward_model), with its tokenizer."""
        path = Path(path).expanduser()
        try:
            model = RewardModel.load(path, device=device)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(
                f"reward.path={path}: {err}; train one with algo=reward_model (it writes <run_dir>/reward_model)"
            ) from None
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer, batch_size)

    @torch.inference_mode()
    def __call__(self, prompts: list[str], completions: list[str], **_) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            batch = encode_texts(
                self.tokenizer,
                prompts[start : start + self.batch_size],
                completions[start : start + self.batch_size],
                self.model.device,
            )
            scores += self.model.score(**batch).tolist()
            self.forward_tokens += int(batch["attention_mask"].sum())
        return scores


def reward_extras(cfg: RewardConfig, device: torch.device | str) -> dict[str, RewardModelScorer]:
    """The caller-supplied rewards a reward config asks for: {"reward_model": scorer} or {}."""
    if "reward_model" not in cfg.weights:
        return {}
    if not cfg.path:
        raise ConfigError(
            "reward.weights has reward_model but reward.path is not set; pass "
            "reward.path=<dir written by algo=reward_model, i.e. <run_dir>/reward_model>"
        )
    return {"reward_model": RewardModelScorer.from_path(cfg.path, device, cfg.batch_size)}
