"""The life of one stage run, shared by SFT, RM and PPO: `StageRun`.

A stage file keeps its recipe (data, model, loss, loop); everything a run's directory needs around it
lives here, once:

    with StageRun(cfg, "sft", "SFT training", ["micro_batch_size", "data.max_length"]) as run:
        if run.finished:                      # a finished run of this config: nothing to do
            return run.out
        model.add_role("policy", adapter_dir=run.resume_path("policy", fresh=None), trainable=True)
        start = run.begin(model, ["policy"], optimizer, scheduler, running_loss=running)
        for step in range(start, total):
            loss = run.halver.run(forward_backward, optimizer)  # from zeroed gradients; OOM: halve, retry
            grad_norm = run.optimizer_step(params, loss, step, batch_id)  # clip, guarded step, schedule
            run.metrics.log(...)
            run.step_done(step + 1, total)    # checkpoints every `checkpoint_every` and at the end
        return run.finish(**summary)          # role dirs, the plot, DONE

Entering: the config is validated and its input paths checked (before any model loads); the run dir
is created and locked (`.lock`, a second writer fails at once with the holder's pid); its owner is
checked; the checkpoint to resume from is found; `config.yaml` is saved; the device is resolved and
the seeds set. The owner rule: a run dir belongs to one stage and one config.

    empty, or --overwrite         a fresh run (--overwrite first says what it removes)
    another stage's run           refused
    another config                refused (fields a resume may change, such as optim.lr, excepted)
    the same config, DONE         `run.finished`: the stage returns the run dir without training
    the same config, unfinished   resumed from its newest checkpoint (resume="auto", the default);
                                  with resume="never" refused, naming --resume auto and --overwrite

Leaving: a NonFiniteError (the guard's stop) first checkpoints the last good state (bad steps are
skipped or undone, so the weights are good); an out-of-memory becomes the error naming the settings
to lower; Ctrl-C says what a rerun will do; the lock is released.

What a checkpoint holds is declared once, in `begin`: the trainable roles, the optimiser and
scheduler, the guard, every random stream, and the stage's own counters (`**pieces`).

Several processes (`rlhf/distributed.py`): rank 0 alone claims, locks and writes the run dir (OWNER,
config.yaml, metrics, checkpoints, role dirs, DONE) and hands the outcome (finished, the checkpoint to
resume from, or its error) to the others; every rank resumes from the same checkpoint with its own
random state, and a checkpoint written by N processes is resumed only by N.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf import distributed
from rlhf.checkpoint import (config_changes, describe_os_error, load_trainer_state, resolve_resume, rng_state,
                             save_checkpoint, save_trainer_state, set_rng_state)
from rlhf.config import read_yaml, save_config, validate
from rlhf.errors import ConfigError, RLHFError
from rlhf.metrics import MetricsLogger, _to_float
from rlhf.stage_dirs import (CONFIG, DONE, RunDirLock, mark_done, read_owner, remove_run, run_contents,
                             write_owner)
from rlhf.training import MicroBatchHalver, NonFiniteError, NonFiniteGuard, is_oom, oom_error, resolve_device, set_seed

log = logging.getLogger("rlhf.stage_run")


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage; its message says what exists and what a rerun does (printed by the CLI)."""


class Piece:
    """A part of the trainer state: how to read it for a checkpoint and how to put it back."""

    def __init__(self, save: Callable[[], Any], load: Callable[[Any], None]):
        self.save, self.load = save, load

    @staticmethod
    def of(thing: Any) -> "Piece":
        """A Piece for an object with state_dict/load_state_dict, a torch.Generator or a tensor counter."""
        if isinstance(thing, Piece):
            return thing
        if isinstance(thing, torch.Generator):
            return Piece(thing.get_state, thing.set_state)
        if isinstance(thing, torch.Tensor):  # a running sum: saved as numbers, loaded in place
            return Piece(thing.tolist, lambda value: thing.copy_(torch.tensor(value)))
        return Piece(thing.state_dict, thing.load_state_dict)


class RankMetrics:
    """What `run.metrics` is on ranks other than 0: the row is computed (its values are global, reduced
    before logging) but only rank 0 writes it."""

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"step": int(step), **{k: _to_float(v) for k, v in metrics.items()}}

    def close(self, plot: bool = True) -> None:
        return None


class StageRun:
    """See the module docstring. `stage` names the stage in OWNER and metrics ("sft", "rm", "ppo");
    `where` and `memory_settings` name it and the settings that lower its memory in an OOM error."""

    def __init__(self, cfg: Any, stage: str, where: str, memory_settings: list[str]):
        self.cfg, self.stage, self.where, self.memory_settings = cfg, stage, where, memory_settings
        self.out = Path(cfg.out_dir)
        self.finished = False
        self.resume_from: Path | None = None
        self.step = 0  # optimiser steps (PPO: iterations) done so far
        self.checkpoint_step: int | None = None  # the newest checkpoint written or resumed from
        self.guard = NonFiniteGuard(cfg.max_nonfinite_in_a_row)
        self.halver = MicroBatchHalver(cfg.micro_batch_size, cfg.auto_halve_micro_batch, where, memory_settings)
        self.metrics: MetricsLogger | None = None
        self._lock = RunDirLock(self.out)
        self._resume = "" if cfg.resume in ("never", "", None) else cfg.resume  # "" for resolve_resume: never
        self._began = False

    # ------------------------------------------------------------------ entering
    def __enter__(self) -> "StageRun":
        distributed.init()
        validate(self.cfg)
        self.cfg.check_inputs()
        self.finished, self.resume_from, self.checkpoint_step = distributed.on_main(
            self._open_locked, f"opening run dir {self.out}")
        try:
            self.device = distributed.place(resolve_device(self.cfg.device))
            set_seed(self.cfg.seed)
        except BaseException:
            self._lock.release()
            raise
        return self

    def _open_locked(self) -> tuple[bool, Path | None, int | None]:
        """Lock the run dir and open it (rank 0 only). -> (finished, resume_from, checkpoint_step)"""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except OSError as err:  # read-only, no space, permission: one line, not a traceback
            raise _run_dir_error(err, self.out) from None
        try:
            self._open()
        except OSError as err:
            self._lock.release()
            raise _run_dir_error(err, self.out) from None
        except BaseException:
            self._lock.release()
            raise
        return self.finished, self.resume_from, self.checkpoint_step

    def _open(self) -> None:
        fresh = self._claim()
        if self.finished:
            return
        if self._resume and not (fresh and self._resume == "auto"):
            self.resume_from = resolve_resume(self.out, self._resume, self.cfg)
        if self.resume_from is not None:
            self.checkpoint_step = _step_of(self.resume_from)
            saved = load_trainer_state(self.resume_from).get("world_size", 1)
            distributed.check_same_world_size(saved, f"checkpoint {self.resume_from}")
        write_owner(self.out, self.stage)
        save_config(self.cfg, self.out / CONFIG)  # after resolve_resume, which may read the old one

    def _claim(self) -> bool:
        """Apply the owner rule (module docstring). -> True when the run dir holds no run (any more)."""
        contents = run_contents(self.out)
        if not contents:
            return True
        if getattr(self.cfg, "overwrite", False):
            remove_run(self.out, contents)
            return True
        where = f"run dir {self.out}"
        fix = "choose another --out, or pass --overwrite to delete it and start over"
        owner = read_owner(self.out)
        if owner is not None and owner != self.stage:
            raise ConfigError(f"{where} holds a {owner} run, not a {self.stage} one; {fix}")
        try:
            saved = read_yaml(self.out / CONFIG)
        except (OSError, RLHFError, ValueError) as err:
            raise ConfigError(f"{where} holds a run whose {CONFIG} cannot be read ({err}); {fix}") from None
        if not isinstance(saved, dict):
            raise ConfigError(f"{where} holds a run whose {CONFIG} is not a mapping; {fix}")
        refused, _ = config_changes(saved, self.cfg)
        if refused:
            shown = "; ".join(refused[:4]) + (f"; and {len(refused) - 4} more" if len(refused) > 4 else "")
            raise ConfigError(f"{where} holds a {owner or 'stage'} run with another config ({shown}); {fix}")
        if (self.out / DONE).is_file():
            log.info("%s: this %s run already finished (%s exists); nothing to do. Pass --overwrite to train "
                     "it again", self.out, self.stage, DONE)
            self.finished = True
            return False
        if not self._resume:
            raise ConfigError(f"{where} holds an unfinished {self.stage} run of this config; pass --resume auto "
                              "to continue it from its newest checkpoint, or --overwrite to start over")
        return False

    def resume_path(self, role: str, fresh: Path | None) -> Path | None:
        """Where `role`'s adapter comes from: the checkpoint when resuming, else `fresh`."""
        return self.resume_from / role if self.resume_from is not None else fresh

    def begin(self, model: Any, roles: list[str], optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, **pieces: Any) -> int:
        """Declare what a checkpoint holds, restore it when resuming, open the metrics log. -> the first step.

        `pieces`: the stage's own state by name (objects with state_dict/load_state_dict, a torch.Generator,
        a tensor of running sums, or a `Piece`)."""
        self.model, self.roles, self.optimizer, self.scheduler = model, roles, optimizer, scheduler
        self.pieces = {"optimizer": Piece.of(optimizer), "scheduler": Piece.of(scheduler), "guard": Piece.of(self.guard),
                       **{name: Piece.of(thing) for name, thing in pieces.items()}}
        # every process starts from rank 0's weights; then each draws from its own random stream (dropout)
        distributed.broadcast_params([p for role in roles for p in model.parameters(role)])
        if distributed.rank() > 0:
            set_seed(distributed.rank_seed(self.cfg.seed))
        if self.resume_from is not None:
            state = load_trainer_state(self.resume_from)
            for name, piece in self.pieces.items():
                piece.load(state[name])
            self._apply_lr()
            set_rng_state(state["rng_per_rank"][distributed.rank()] if "rng_per_rank" in state else state["rng"])
            self.step = self.checkpoint_step = state["step"]
            log.info("%s: resumed from %s at step %d", self.stage, self.resume_from, self.step)
        resume_step = self.step if self.resume_from else None
        self.metrics = MetricsLogger(self.out, self.stage, resume_step) if distributed.is_main() else RankMetrics()
        self._began = True
        return self.step

    def _apply_lr(self) -> None:
        """A resume may change optim.lr (the guard's advice): the optimiser and scheduler states loaded
        from the checkpoint carry the old rate, so the schedule is re-based on the new one."""
        lr = self.cfg.optim.lr
        groups = self.optimizer.param_groups
        if all(group.get("initial_lr") == lr for group in groups):
            return  # unchanged: keep the loaded values bit for bit
        self.scheduler.base_lrs = [lr] * len(groups)
        for group, factor in zip(groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in groups]

    # ------------------------------------------------------------------ during
    def checkpoint(self, step: int) -> None:
        """Save the roles and the trainer state as checkpoint `step` (rank 0 writes; every rank's random state)."""
        rngs = distributed.gather_objects(rng_state())
        per_rank = {"rng_per_rank": rngs, "world_size": len(rngs)} if len(rngs) > 1 else {}

        def write(directory: Path) -> None:
            for role in self.roles:
                self.model.save_role(role, directory / role)
            save_trainer_state(directory, {"step": step, **{name: piece.save() for name, piece in self.pieces.items()},
                                           "rng": rngs[0], **per_rank})
        distributed.on_main(lambda: save_checkpoint(self.out, step, write, keep_last=self.cfg.keep_last,
                                                    config=self.cfg), f"checkpoint {step}")
        self.checkpoint_step = step

    def optimizer_step(self, params: list[torch.nn.Parameter], loss: torch.Tensor, step: int,
                       batch_id: str) -> torch.Tensor:
        """Clip the gradient, step the optimiser through the guard (skipped or undone when non-finite), then
        advance the schedule (PPO, which steps once per mini-batch and schedules once per iteration, calls
        the guard's `clip_and_step` itself). -> the gradient norm before clipping."""
        grad_norm = self.guard.clip_and_step(self.optimizer, params, self.cfg.optim.max_grad_norm, loss, step,
                                             batch_id)
        self.scheduler.step()
        return grad_norm

    def step_done(self, done: int, total: int) -> None:
        """`done` steps are done: checkpoint every `checkpoint_every` steps and after the last one."""
        self.step = done
        if done % self.cfg.checkpoint_every == 0 or done == total:
            self.checkpoint(done)

    def finish(self, **summary: Any) -> Path:
        """Close the metrics log (and plot it), save each role into `<out>/<role>`, write DONE. -> the run dir.
        Rank 0 writes; every process returns once the files are there (a next stage may read them)."""
        def write() -> None:
            self.metrics.close()
            for role in self.roles:
                self.model.save_role(role, self.out / role)
            mark_done(self.out, **summary)
        distributed.on_main(write, "finishing the run")
        self.finished = True
        return self.out

    # ------------------------------------------------------------------ leaving
    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is None or self.finished:
                return
            if self.metrics is not None:
                self.metrics.close(plot=False)
            if isinstance(exc, NonFiniteError) and self._began:
                self.checkpoint(self.step)  # bad steps were skipped or undone: the weights are the last good ones
            elif isinstance(exc, RuntimeError) and is_oom(exc):
                raise oom_error(self.where, self.memory_settings,
                                can_halve=not self.cfg.auto_halve_micro_batch) from exc
            elif isinstance(exc, KeyboardInterrupt) and not isinstance(exc, StageInterrupted):
                raise StageInterrupted(self.interrupted_message()) from exc
            elif isinstance(exc, OSError):  # a metrics or role write: the checkpoints saved so far stay
                raise _run_dir_error(exc, self.out) from exc
        finally:
            self._lock.release()

    def interrupted_message(self) -> str:
        """What Ctrl-C leaves, and what rerunning the same command will do."""
        at = f"interrupted at step {self.step}" if self._began else "interrupted before training started"
        if self.checkpoint_step is None:
            return (f"{at}; no checkpoint yet (checkpoint_every={self.cfg.checkpoint_every}): rerunning starts "
                    "over")
        rerun = "rerun the same command" if self._resume else "rerun with --resume auto"
        return f"{at}; the newest checkpoint is step {self.checkpoint_step}: {rerun} to continue from it"



def _run_dir_error(err: OSError, out: Path) -> RLHFError:
    return RLHFError(f"cannot write the run dir: {describe_os_error(err, out)}; free space, fix the permissions "
                     "or choose another --out (checkpoints already saved are kept)")


def _step_of(checkpoint: Path) -> int | None:
    """The step of a `step-XXXXXXXX` checkpoint dir (None for a dir named otherwise)."""
    try:
        return int(checkpoint.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return None
