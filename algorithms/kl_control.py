"""The coefficient of PPO's per-token KL penalty: fixed, or adapted toward a target KL.

Adaptive rule of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences", sec. 2.2):
    e_t = clip(KL_t / target - 1, -0.2, 0.2);   beta_{t+1} = beta_t * (1 + K_beta * e_t * n_steps / horizon)
with KL_t the mean per-sequence KL of the batch, n_steps the batch's sequences and K_beta = 1 as in TRL.
"""

from __future__ import annotations


class KLController:
    """`value` is the current beta; `update` is called once per RL step with the batch's KL."""

    def __init__(self, beta: float, adaptive: bool = False, target: float = 6.0, horizon: int = 10000):
        self.value = float(beta)
        self.adaptive, self.target, self.horizon = adaptive, float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """current_kl: mean KL per sequence (nats); n_steps: sequences in the batch. Returns the new beta."""
        if self.adaptive:
            proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
