"""Pieces every stage's loop shares: optimiser and schedule, seeding, mixed precision, numeric guards.

Each is one small call so the stage loops (`rlhf/sft.py`, `rlhf/reward.py`, `rlhf/ppo/loop.py`) read
top to bottom in the paper's order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from typing import Iterable

import numpy as np
import torch

from rlhf.errors import ConfigError, RLHFError
from rlhf.optim_config import OptimConfig  # noqa: F401  (re-exported: `from rlhf.training import OptimConfig`)

log = logging.getLogger("rlhf.training")


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise RLHFError("no trainable parameters: the role's adapter and head are all frozen")
    # fused: one kernel for all tensors instead of a dozen small ops per LoRA matrix (a PPO step updates
    # ~60 of them: 1.1 ms -> 0.2 ms on a 2-core CPU); elementwise, so a resumed run stays bitwise equal
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                             fused=fused, foreach=False if not fused else None)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    """Linear warm-up, then cosine decay from the peak rate to `min_lr_ratio` of it."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total_steps - warmup, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def exact_div(a: int, b: int, what: str) -> int:
    """a / b when it divides exactly; otherwise a ConfigError that shows the numbers."""
    if b <= 0 or a % b != 0:
        raise ConfigError(f"{what}: {a} is not divisible by {b}")
    return a // b


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (the GPU default), nothing on CPU or when precision is fp32."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast("cuda", dtype=dtype)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' requested but CUDA is not available; use device=cpu")
    return torch.device(name)


class NonFiniteError(RLHFError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Skip an optimiser step whose loss or gradient is not finite; stop after `max_in_a_row`.

    A single bad batch (an fp16 overflow, a corrupt record) should cost one step, not the run; many
    in a row mean the run has diverged, and going on would only overwrite good weights.
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped_total = 0

    def ok(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, batch_id: str) -> bool:
        finite = bool(torch.isfinite(loss).item() and torch.isfinite(grad_norm).item())  # sync point
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped_total += 1
        log.warning("step %d: non-finite loss (%s) or gradient norm (%s) on batch %s; optimiser step skipped "
                    "(%d in a row, %d in total)", step, loss.item(), grad_norm.item(), batch_id,
                    self.in_a_row, self.skipped_total)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} optimiser steps in a row had a non-finite loss or gradient "
                f"(last batch: {batch_id}); stopping. The last good state is in the newest checkpoint. "
                "Lower optim.lr, use bf16 instead of fp16, or check the data.")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row = state["in_a_row"]
        self.skipped_total = state["skipped_total"]


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def oom_error(where: str, settings: list[str], can_halve: bool = False) -> RLHFError:
    """The error for an out-of-memory in `where`, naming the settings that lower its memory."""
    hint = " (or set auto_halve_micro_batch=true to halve the micro-batch and go on)" if can_halve else ""
    return RLHFError(f"out of memory during {where}; lower one of: {', '.join(settings)}{hint}")


class MicroBatchHalver:
    """Runs one optimiser step's micro-batches; on out-of-memory, halves the micro-batch and retries
    the whole step when `enabled` (the same rows, so the same update in smaller pieces), else raises
    the error that names `settings`. The halved size is kept for the rest of the run."""

    def __init__(self, micro_batch_size: int, enabled: bool, where: str, settings: list[str]):
        self.micro_batch_size = micro_batch_size
        self.enabled, self.where, self.settings = enabled, where, settings

    def run(self, step_fn, optimizer: torch.optim.Optimizer):
        """`step_fn(micro_batch_size)` does the forwards and backwards of one step; returns its result."""
        while True:
            try:
                return step_fn(self.micro_batch_size)
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                if not self.enabled or self.micro_batch_size == 1:
                    raise oom_error(self.where, self.settings, can_halve=not self.enabled) from err
                optimizer.zero_grad(set_to_none=True)  # drop the failed attempt's partial gradients
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.micro_batch_size //= 2
                log.warning("out of memory during %s; micro_batch_size halved to %d", self.where,
                            self.micro_batch_size)
