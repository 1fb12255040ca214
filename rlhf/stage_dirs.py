"""The layout of a stage's run directory, shared by the stages and the pipeline.

    <run>/OWNER                the stage that owns the run dir ({"stage": "sft"}), written first
    <run>/.lock                held (flock) by the process writing the run; holds its pid
    <run>/config.yaml          the resolved config
    <run>/<role>/              peft adapter (+ head.safetensors for reward and value)
    <run>/checkpoints/step-N/  resumable state
    <run>/metrics.jsonl, metrics.png
    <run>/DONE                 written last: the stage finished and its outputs are complete
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

from rlhf.errors import ConfigError, RLHFError

log = logging.getLogger("rlhf.stage_dirs")

DONE = "DONE"
OWNER = "OWNER"
LOCK = ".lock"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
# what a stage writes into its run dir besides its role dirs: what --overwrite removes
RUN_FILES = (OWNER, CONFIG, CHECKPOINTS, METRICS, "tensorboard", DONE)


def adapter_dir(run_dir: str | os.PathLike, role: str) -> Path:
    """`<run_dir>/<role>`, or a clear error when the run did not produce it."""
    path = Path(run_dir) / role
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"'{run_dir}' has no '{role}' adapter (expected {path}/adapter_config.json); "
                          "is it the run directory of the right stage, and did that stage finish?")
    return path


def mark_done(run_dir: str | os.PathLike, **summary) -> None:
    path = Path(run_dir) / DONE
    tmp = path.with_name(DONE + ".tmp")
    tmp.write_text(json.dumps(summary), encoding="utf-8")
    os.replace(tmp, path)


def is_done(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / DONE).is_file()


def run_contents(run_dir: str | os.PathLike) -> list[Path]:
    """What a stage run left in `run_dir`: its files, role dirs and plots (empty: no run there)."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [root / name for name in RUN_FILES if (root / name).exists()]
    found += sorted(p for p in root.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file())
    found += sorted(root.glob("*metrics.png"))  # metrics.png (and <stage>_metrics.png of older runs)
    return found


def read_owner(run_dir: str | os.PathLike) -> str | None:
    """The stage that owns `run_dir` (None: no OWNER file, e.g. a run dir of an older version)."""
    try:
        return json.loads((Path(run_dir) / OWNER).read_text(encoding="utf-8"))["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_owner(run_dir: str | os.PathLike, stage: str) -> None:
    path = Path(run_dir) / OWNER
    tmp = path.with_name(OWNER + ".tmp")
    tmp.write_text(json.dumps({"stage": stage}), encoding="utf-8")
    os.replace(tmp, path)


def describe(path: Path) -> str:
    """A removed item as the --overwrite message names it: `checkpoints/ (2)`, `metrics.jsonl (44 rows)`."""
    if path.name == CHECKPOINTS:
        return f"{CHECKPOINTS}/ ({sum(1 for p in path.glob('step-*') if p.is_dir())} checkpoints)"
    if path.name == METRICS:
        with open(path, "rb") as fh:
            return f"{METRICS} ({sum(1 for line in fh if line.strip())} rows)"
    return path.name + ("/" if path.is_dir() else "")


def remove_run(run_dir: str | os.PathLike, contents: list[Path]) -> None:
    """Delete what a stage run left in `run_dir` (--overwrite), saying what at WARNING."""
    log.warning("--overwrite: removing from %s: %s", run_dir, ", ".join(describe(p) for p in contents))
    for path in contents:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


class RunDirLock:
    """`fcntl.flock` on `<run_dir>/.lock`, held while a stage writes the run dir; the file holds the pid.

    A second writer fails at once, naming the holder, instead of deleting the other's temporary
    checkpoint as stale. The kernel drops the lock when the process dies, so a killed run never leaves
    a lock behind (the file stays; only the flock counts)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self._fh = None

    def acquire(self) -> None:
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RLHFError(f"run dir {self.path.parent} is in use by pid {holder}; wait for that run to end "
                                "or choose another --out") from None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
