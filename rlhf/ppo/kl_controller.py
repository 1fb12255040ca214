"""The KL coefficient beta: fixed, or adapted toward a target KL.

The adaptive rule is the one of Ziegler et al. (2019), openai/lm-human-preferences
`lm_human_preferences/train_policy.py` `AdaptiveKLController` (commit cbfd210):

    err = clip(KL / target - 1, -0.2, 0.2);  beta *= 1 + err * n_steps / horizon

so beta grows when the policy drifts past the target and shrinks when it stays close, by at most
20% per `horizon` steps. InstructGPT used a fixed beta = 0.02.
"""

from __future__ import annotations


class KLController:
    """beta for the per-token penalty; `update` is a no-op unless `target` is set."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.value = coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]
