"""`OptimConfig`: AdamW and its warm-up + cosine schedule, shared by every stage (torch-free, so
`rlhf <stage> --help` can read it without importing torch; the optimiser itself is built in
`rlhf/training.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.errors import ConfigError


@dataclass
class OptimConfig:
    lr: float = 1e-3  # ours: LoRA on a tiny model tolerates a large rate; scale down for real models
    weight_decay: float = 0.0  # ours: LoRA adapters are small; no decay, as peft's examples
    adam_eps: float = 1e-5  # InstructGPT/openai baselines PPO detail; harmless for SFT and RM
    warmup_steps: int = 10  # ours: a short warm-up keeps the first Adam steps from overshooting
    min_lr_ratio: float = 0.1  # InstructGPT SFT: cosine decay to 10% of the peak rate
    max_grad_norm: float = 1.0  # ours: the usual clip; InstructGPT does not state one

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"optim.max_grad_norm must be > 0, got {self.max_grad_norm}")
