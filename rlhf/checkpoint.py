"""Atomic, complete-or-absent checkpoints in `run_dir/checkpoints/step-XXXXXXXX/`.

A stage writes its parts (adapters, heads, `trainer_state.pt`) into a temporary directory; we fsync
every file, add a `COMPLETE` marker, then rename the directory into place. A kill at any moment
leaves either the previous checkpoints or the new one, never a half-written one that looks whole:
`latest_checkpoint` only picks directories that hold the marker.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rlhf.errors import ConfigError

log = logging.getLogger("rlhf.checkpoint")

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith("step-") and (path / MARKER).is_file():
            try:
                found.append((int(path.name.split("-", 1)[1]), path))
            except ValueError:
                continue
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of `run_dir`, or None."""
    found = _step_dirs(Path(run_dir))
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, write: Callable[[Path], None],
                    keep_last: int = 2) -> Path:
    """Call `write(tmp_dir)` to fill a checkpoint, then publish it atomically as `step-<step>`."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}"
    tmp.mkdir()
    write(tmp)
    (tmp / MARKER).write_text(json.dumps({"step": step}), encoding="utf-8")
    _fsync_tree(tmp)
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step saved twice (periodic, then end of stage): newest wins
        old = root / f".tmp-old-{step:08d}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    for _, path in _step_dirs(Path(run_dir))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    log.info("checkpoint saved: %s", final)
    return final


def rng_state() -> dict[str, Any]:
    """Every random stream a run draws from, so a resumed run draws the same numbers."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    torch.save(state, directory / TRAINER_STATE)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    # weights_only=False: the state holds python/numpy RNG tuples, and we wrote it ourselves
    return torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=False)


def resolve_resume(run_dir: str | os.PathLike, resume: str) -> Path | None:
    """`resume`: "" (start fresh), "auto" (newest complete checkpoint if any) or a checkpoint path."""
    if not resume:
        return None
    if resume == "auto":
        found = latest_checkpoint(run_dir)
        if found is None:
            log.info("resume=auto: no complete checkpoint in %s, starting fresh", run_dir)
        return found
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise ConfigError(f"resume: '{resume}' is not a complete checkpoint directory (no {MARKER} marker)")
    return path
