"""Reward functions, registered by name and combined with weights from `conf/reward/*.yaml`.

Importing the package registers the shipped rewards: format, format_soft (rewards.format),
accuracy, similarity (rewards.accuracy), language, length (rewards.shaping), keyword
(rewards.keyword). The learned reward model is passed at run time: `build_reward(cfg, extra=...)`.
"""

from rewards import accuracy, format, keyword, shaping  # noqa: F401  (registration side effects)
from rewards.combine import CombinedReward, RewardOutput, build_reward
from rewards.registry import REWARDS, register

__all__ = ["REWARDS", "CombinedReward", "RewardOutput", "build_reward", "register"]
