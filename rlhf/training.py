"""Pieces every stage's loop shares: optimiser and schedule, seeding, mixed precision, numeric guards.

Each is one small call so the stage loops (`rlhf/sft.py`, `rlhf/reward.py`, `rlhf/ppo/loop.py`) read
top to bottom in the paper's order.

Maintained equivalents (issue 16.7), compared on the toy configs:
- `set_seed` is transformers' own: it seeds `random`, numpy, torch and every CUDA device, the same
  draws as the copy it replaces (the toy metrics are identical).
- `cosine_schedule` stays ours. transformers' `get_cosine_with_min_lr_schedule_with_warmup` gives
  the same rates after the warm-up (40 of 60 steps equal, bit for bit, at SFT's defaults), but its
  warm-up starts at rate 0 (`step / warmup`), so the first step is spent at lr 0 and every warm-up
  rate differs from ours (`(step + 1) / (warmup + 1)`): the README's numbers would move for no gain.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable

import torch
from transformers import set_seed  # noqa: F401  (re-exported: the stages and benchmarks seed with it)

from rlhf import distributed
from rlhf.errors import RLHFError
from rlhf.models.base import resolve_device  # noqa: F401  (re-exported for the stages, eval and pipeline)
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


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (the GPU default), nothing on CPU or when precision is fp32."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast("cuda", dtype=dtype)


class NonFiniteError(RLHFError):
    """Too many optimiser steps in a row had a non-finite loss or gradient, or gave non-finite weights."""


# the advice of the stop message: a resume may lower the rate (`rlhf.checkpoint.RESUME_ADJUSTABLE_FIELDS`)
NONFINITE_ADVICE = ("Lower optim.lr and rerun the same command with --optim.lr <lower> to continue from that "
                    "checkpoint (the rate, max_grad_norm and max_nonfinite_in_a_row may change on a resume), "
                    "use bf16 instead of fp16, or check the data.")


class StepUndo:
    """A copy of the trainable weights and the optimiser's state, taken before a step, to undo it.

    Cost: one more copy of the adapters, their heads and Adam's two moments (LoRA: a few MB even on a 7B
    base), refreshed with one `torch._foreach_copy_` per step, and one max-abs norm per tensor after the
    step (a single sync with the loss check's). The weights after a step are finite iff every max-abs
    norm is: NaN and inf propagate through it, and unlike a 2-norm it never overflows on large finite values.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self._tensors: list[torch.Tensor] = []
        self._copies: list[torch.Tensor] = []
        self._had_state: list[bool] = []

    def _live(self) -> list[torch.Tensor]:
        """The weights, then every tensor of the optimiser's per-parameter state (Adam: step, exp_avg, exp_avg_sq)."""
        state = self.optimizer.state
        return self.params + [value for p in self.params for _, value in sorted(state.get(p, {}).items())
                              if isinstance(value, torch.Tensor)]

    def take(self) -> None:
        tensors = self._live()
        if [t.shape for t in tensors] != [c.shape for c in self._copies] or any(
                a is not b for a, b in zip(tensors, self._tensors)):
            self._copies = [t.detach().clone() for t in tensors]  # first step (Adam's state appears) or a reload
        else:
            torch._foreach_copy_(self._copies, [t.detach() for t in tensors])
        self._tensors = tensors
        self._had_state = [bool(self.optimizer.state.get(p)) for p in self.params]

    def all_finite(self) -> bool:
        tensors = [t.detach() for t in self._live() if t.numel()]
        norms = torch._foreach_norm(tensors, float("inf"))  # max |x| per tensor; NaN and inf propagate
        return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all().item())  # sync point

    def restore(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_([t.detach() for t in self._tensors], self._copies)
        for p, had in zip(self.params, self._had_state):
            if not had:  # the undone step created this state (the first step): drop it again
                self.optimizer.state.pop(p, None)


class NonFiniteGuard:
    """Skip an optimiser step whose loss or gradient is not finite, undo one that leaves non-finite weights
    or optimiser state (a rate too high: the loss and gradient were finite, the update was not); stop
    after `max_in_a_row` such steps.

    A single bad batch (an fp16 overflow, a corrupt record) should cost one step, not the run; many
    in a row mean the run has diverged, and going on would only overwrite good weights. Skipped and
    undone steps leave the weights bitwise those of the step before, so a checkpoint never holds
    non-finite weights.
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped_total = 0
        self._undo: StepUndo | None = None

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_norm: torch.Tensor, step: int,
             batch_id: str) -> bool:
        """`optimizer.step()` unless the loss or gradient is non-finite; undone if the weights become so.
        -> whether the step was applied."""
        if not bool(torch.isfinite(loss).item() and torch.isfinite(grad_norm).item()):  # sync point
            self._bad(step, batch_id, f"non-finite loss ({loss.item()}) or gradient norm ({grad_norm.item()})",
                      "optimiser step skipped")
            return False
        if self._undo is None or self._undo.optimizer is not optimizer:
            self._undo = StepUndo(optimizer)
        self._undo.take()
        optimizer.step()
        if not self._undo.all_finite():
            self._undo.restore()
            self._bad(step, batch_id, f"finite loss ({loss.item():.4g}) and gradient norm ({grad_norm.item():.4g}) "
                      "but the update made the weights or the optimiser state non-finite", "step undone")
            return False
        self.in_a_row = 0
        return True

    def clip_and_step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_grad_norm: float,
                      loss: torch.Tensor, step: int, batch_id: str) -> torch.Tensor:
        """Clip the gradient of `params` to `max_grad_norm`, then `step` through the guard. -> the norm
        before clipping (the one every stage logs)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        self.step(optimizer, loss, grad_norm, step, batch_id)
        return grad_norm

    def _bad(self, step: int, batch_id: str, what: str, action: str) -> None:
        self.in_a_row += 1
        self.skipped_total += 1
        log.warning("step %d: %s on batch %s; %s (%d in a row, %d in total)", step, what, batch_id, action,
                    self.in_a_row, self.skipped_total)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} optimiser steps in a row had a non-finite loss or gradient "
                f"or gave non-finite weights (last batch: {batch_id}); stopping. The last good state is in "
                f"the newest checkpoint. {NONFINITE_ADVICE}")

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # a checkpoint written by the stop holds a full count: the rerun (say at a lower rate) starts a new one
        self.in_a_row = state["in_a_row"] if state["in_a_row"] < self.max_in_a_row else 0
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
    the error that names `settings`. The halved size is kept for the rest of the run.

        for attempt in halver.attempts(optimizer):     # from zeroed gradients; after an OOM, again
            with attempt:                              # an OOM in here halves attempt.micro_batch_size
                ... forwards and backwards in micro-batches of attempt.micro_batch_size rows ...
    """

    def __init__(self, micro_batch_size: int, enabled: bool, where: str, settings: list[str]):
        self.micro_batch_size = micro_batch_size
        self.enabled, self.where, self.settings = enabled, where, settings

    def attempts(self, optimizer: torch.optim.Optimizer):
        """Yield one `_Attempt` per try at a step, each from zeroed gradients, until one ends without an OOM."""
        while True:
            optimizer.zero_grad(set_to_none=True)  # also drops a failed attempt's partial gradients
            attempt = _Attempt(self)
            yield attempt
            # several processes: an out-of-memory on any of them halves the micro-batch on all of them
            if distributed.any_true(attempt.out_of_memory) and not attempt.out_of_memory:
                self._halve_for_another_process()
                continue
            if not attempt.out_of_memory:
                return

    def _halve_for_another_process(self) -> None:
        if not self.enabled or self.micro_batch_size == 1:
            raise oom_error(self.where, self.settings, can_halve=not self.enabled)
        self.micro_batch_size //= 2
        log.warning("out of memory on another process during %s; micro_batch_size halved to %d", self.where,
                    self.micro_batch_size)

    def run(self, step_fn, optimizer: torch.optim.Optimizer):
        """`step_fn(micro_batch_size)` does the forwards and backwards of one step; returns its result."""
        for attempt in self.attempts(optimizer):
            with attempt:
                result = step_fn(attempt.micro_batch_size)
        return result


class _Attempt:
    """One try at a step's forwards and backwards (see `MicroBatchHalver.attempts`)."""

    def __init__(self, halver: MicroBatchHalver):
        self.halver = halver
        self.micro_batch_size = halver.micro_batch_size
        self.out_of_memory = False

    def __enter__(self) -> "_Attempt":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        halver = self.halver
        if exc is None or not isinstance(exc, RuntimeError) or not is_oom(exc):
            return False
        if not halver.enabled or halver.micro_batch_size == 1:
            raise oom_error(halver.where, halver.settings, can_halve=not halver.enabled) from exc
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        halver.micro_batch_size //= 2
        log.warning("out of memory during %s; micro_batch_size halved to %d", halver.where, halver.micro_batch_size)
        self.out_of_memory = True
        return True  # swallowed: `attempts` yields the next try
