"""`RMConfig`: stage 2's settings (see `rlhf/reward.py`). Torch-free, so `rlhf rm --help` is fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config import ChatTemplateSetting, require_model_source, require_path
from rlhf.errors import ConfigError
from rlhf.models.config import ModelConfig
from rlhf.optim_config import OptimConfig
from rlhf.stage_dirs import adapter_dir


@dataclass
class RMData:
    path: str = ""  # rankings {"prompt", "responses": [best, ..., worst]} or pairwise {"chosen", "rejected"}
    demonstrations: str = ""  # SFT demonstrations whose mean score is shifted to 0; "" = the best answers
    split: str = ""  # split.json: the train / tune / test users every stage shares (trains on train, validates on tune);
    # "" = the split.json beside data.path (the toy world and `rlhf pipeline` write one), else hashed users
    max_length: int = 64  # ours: toy sequences are < 40 tokens
    use_chat_template: ChatTemplateSetting = "auto"  # ours: the model's own chat format whenever it has one; one
    # value for every stage, so the policy is trained and scored on the text it sees at rollout time
    skip_invalid: bool = False  # ours: fail on bad records unless asked to skip and count them


@dataclass
class RMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: RMData = field(default_factory=RMData)
    sft_dir: str = ""  # SFT run dir: the reward adapter starts from its policy adapter; "" = from scratch
    out_dir: str = "runs/rm"  # the run directory: reward/ adapter + head, config.yaml, metrics, checkpoints/
    epochs: int = 1  # InstructGPT RM: one epoch (more overfits)
    batch_size: int = 8  # ours: prompts (each with all its K answers) per optimiser step
    micro_batch_size: int = 8  # ours: prompts per forward
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=5, min_lr_ratio=0.1))
    # lr ours (LoRA, tiny model); cosine decay as InstructGPT's RM schedule
    margin: float = 0.0  # Llama 2 style margin; InstructGPT uses none
    center_coef: float = 0.0  # Eisenstein et al. 2023 / TRL center_rewards_coefficient; off as InstructGPT
    eval_every: int = 50  # ours: optimiser steps between validation passes
    log_every: int = 5  # ours: optimiser steps per logged train_loss mean
    checkpoint_every: int = 100  # ours: optimiser steps between checkpoints
    keep_last: int = 2  # ours: checkpoints kept on disk
    resume: str = "auto"  # "auto": continue this run from its newest checkpoint; a checkpoint path; "never"
    overwrite: bool = False  # delete a run already in out_dir (another config or stage, or finished) and start over
    max_nonfinite_in_a_row: int = 3  # ours: a few non-finite steps are skipped; more means divergence
    auto_halve_micro_batch: bool = False  # ours: on out-of-memory, halve micro_batch_size and retry the step
    seed: int = 0  # python, numpy and torch seeds, and the batch order
    device: str = "auto"  # "auto": cuda when available, else cpu; or "cpu", "cuda", "cuda:1"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # "auto": bf16 autocast on CUDA; fp32 on CPU

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size={self.batch_size} must be a positive multiple of "
                              f"micro_batch_size={self.micro_batch_size}")
        if self.center_coef < 0:
            raise ConfigError(f"center_coef must be >= 0, got {self.center_coef}")
        if min(self.eval_every, self.log_every, self.checkpoint_every, self.keep_last) < 1:
            raise ConfigError("eval_every, log_every, checkpoint_every and keep_last must be >= 1")

    def check_inputs(self) -> None:
        """The paths this run reads exist (before any model loads)."""
        require_model_source(self.model.path, "model.path")
        require_path(self.data.path, "data.path", "rankings file", "--data rankings.jsonl")
        if self.data.demonstrations:
            require_path(self.data.demonstrations, "data.demonstrations", "demonstrations file", "--demos sft.jsonl")
        if self.sft_dir:
            adapter_dir(self.sft_dir, "policy")
