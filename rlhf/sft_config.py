"""`SFTConfig`: stage 1's settings (see `rlhf/sft.py`). Torch-free, so `rlhf sft --help` is fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf.config import ChatTemplateSetting, require_model_source, require_path
from rlhf.errors import ConfigError
from rlhf.models.config import ModelConfig
from rlhf.optim_config import OptimConfig


@dataclass
class SFTData:
    path: str = ""  # demonstrations: {"prompt", "completion"} or {"messages"} records
    split: str = ""  # split.json: the train / tune / test users every stage shares (trains on train, validates on tune);
    # "" = the split.json beside data.path (the toy world and `rlhf pipeline` write one), else hashed users
    max_length: int = 64  # ours: toy sequences are < 40 tokens; longer prompts are cut from the left
    use_chat_template: ChatTemplateSetting = "auto"  # ours: the model's own chat format whenever it has one; one
    # value for every stage, so the policy is trained and scored on the text it sees at rollout time
    skip_invalid: bool = False  # ours: fail on bad records unless asked to skip and count them


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(lora_dropout=0.2))
    # InstructGPT SFT: residual dropout 0.2 (here on the LoRA branch; PPO runs with dropout off)
    data: SFTData = field(default_factory=SFTData)
    out_dir: str = "runs/sft"  # the run directory: policy/ adapter, config.yaml, metrics, checkpoints/
    epochs: int = 16  # InstructGPT SFT: 16 epochs; overfits after 1, the RM score still improves
    batch_size: int = 32  # ours: sequences per optimiser step
    micro_batch_size: int = 32  # ours: sequences per forward; accumulation = batch / micro
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=20, min_lr_ratio=0.1))
    # lr ours (LoRA on a tiny model); min_lr_ratio 0.1: InstructGPT cosine decay to 10%
    eval_every: int = 100  # ours: optimiser steps between validation passes (and at each epoch's end)
    log_every: int = 10  # ours: optimiser steps per logged train_loss mean
    checkpoint_every: int = 200  # ours: optimiser steps between checkpoints
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
        if min(self.eval_every, self.log_every, self.checkpoint_every, self.keep_last) < 1:
            raise ConfigError("eval_every, log_every, checkpoint_every and keep_last must be >= 1")

    def check_inputs(self) -> None:
        """The paths this run reads exist (before any model loads)."""
        require_model_source(self.model.path, "model.path")
        require_path(self.data.path, "data.path", "demonstrations file", "--data sft.jsonl")
