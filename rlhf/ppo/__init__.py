"""Stage 3: PPO / PPO-ptx. `train(PPOConfig(...))`; the recipe reads top to bottom in `loop.py`.

The names below load on first use (PEP 562), so `import rlhf.ppo.config` (what `rlhf ppo --help`
reads) does not import torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf.lazy_exports import lazy_exports

_SOURCES = {
    "GAEConfig": "rlhf.ppo.config",
    "KLConfig": "rlhf.ppo.config",
    "PPOConfig": "rlhf.ppo.config",
    "PPOData": "rlhf.ppo.config",
    "RolloutConfig": "rlhf.ppo.config",
    "train": "rlhf.ppo.loop",
}
__all__ = sorted(_SOURCES)

if TYPE_CHECKING:
    from rlhf.ppo.config import GAEConfig, KLConfig, PPOConfig, PPOData, RolloutConfig
    from rlhf.ppo.loop import train


__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
