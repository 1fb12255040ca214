"""Stage 3: PPO / PPO-ptx. `train(PPOConfig(...))`; the recipe reads top to bottom in `loop.py`."""

from rlhf.ppo.config import GAEConfig, KLConfig, PPOConfig, PPOData, RolloutConfig
from rlhf.ppo.loop import train

__all__ = ["GAEConfig", "KLConfig", "PPOConfig", "PPOData", "RolloutConfig", "train"]
