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

from rlhf.config import read_yaml, save_config, to_dict
from rlhf.errors import ConfigError

log = logging.getLogger("rlhf.checkpoint")

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
CONFIG = "config.yaml"
# fields that may change between a run and its resumption: bookkeeping, and the memory knobs a
# user lowers to get past an out-of-memory (the same update, summed in another order)
RESUME_FREE_FIELDS = {"resume", "overwrite", "out_dir", "device", "log_every", "checkpoint_every", "keep_last",
                      "micro_batch_size", "gradient_checkpointing", "auto_halve_micro_batch"}
# dotted fields a resume may change, logged at WARNING as a change: they steer the steps still to come
# and leave what was trained so far as it is (the non-finite guard's advice is to lower the rate).
# Everything else (data, model, seeds, epochs/iterations, batch sizes, the loss) makes another run.
RESUME_ADJUSTABLE_FIELDS = {"optim.lr", "optim.max_grad_norm", "max_nonfinite_in_a_row", "eval_every"}


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
                    keep_last: int = 2, config: Any = None) -> Path:
    """Call `write(tmp_dir)` to fill a checkpoint, then publish it atomically as `step-<step>`.

    `config` (the run's resolved config dataclass) is saved beside the state, so a resumption can
    check that it continues the same run (`resolve_resume`)."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}"
    tmp.mkdir()
    write(tmp)
    if config is not None:
        save_config(config, tmp / CONFIG)
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


def resolve_resume(run_dir: str | os.PathLike, resume: str, config: Any = None) -> Path | None:
    """`resume`: "" (start fresh), "auto" (newest complete checkpoint if any) or a checkpoint path.

    With `config`, a checkpoint saved under a different config is refused: the resumed run would
    silently be a different run (another schedule, data order or loss) while claiming to continue it.
    """
    if not resume:
        return None
    if resume == "auto":
        found = latest_checkpoint(run_dir)
        if found is None:
            log.info("resume=auto: no complete checkpoint in %s, starting fresh", run_dir)
            return None
        path = found
    else:
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise ConfigError(f"resume: '{resume}' is not a complete checkpoint directory (no {MARKER} marker)")
    if config is not None:
        check_same_config(path, config)
    return path


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def config_changes(saved: dict[str, Any], config: Any) -> tuple[list[str], list[str]]:
    """Compare a saved config (a dict read from config.yaml) with `config`. -> (refused, adjusted): the
    differing fields as "field: old -> new", those that make another run and those a resume may change."""
    flat_saved, flat_current = _flatten(saved), _flatten(to_dict(config))
    refused, adjusted = [], []
    for key in sorted(set(flat_saved) | set(flat_current)):
        old, new = flat_saved.get(key), flat_current.get(key)
        if key.split(".")[-1] in RESUME_FREE_FIELDS or old == new:
            continue
        (adjusted if key in RESUME_ADJUSTABLE_FIELDS else refused).append(f"{key}: {old!r} -> {new!r}")
    return refused, adjusted


def check_same_config(checkpoint: Path, config: Any) -> None:
    """Raise ConfigError naming every field whose value differs from the one `checkpoint` was saved with,
    except those a resume may change (`RESUME_ADJUSTABLE_FIELDS`), which are logged at WARNING."""
    saved_file = checkpoint / CONFIG
    if not saved_file.is_file():
        log.warning("%s has no %s: cannot check that the resumed run uses the same config", checkpoint, CONFIG)
        return
    refused, adjusted = config_changes(read_yaml(saved_file), config)
    if refused:
        raise ConfigError(f"resume: the config differs from the one {checkpoint} was saved with ("
                          + "; ".join(refused) + "). Resume with the same values, or start over "
                          "(another --out, or --overwrite)")
    for change in adjusted:
        log.warning("resume: %s changed (%s); the steps already taken stay as they were", change.split(":")[0],
                    change)
