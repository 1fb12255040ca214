"""The layout of a stage's run directory, shared by the stages and the pipeline.

    <run>/config.yaml          the resolved config
    <run>/<role>/              peft adapter (+ head.safetensors for reward and value)
    <run>/checkpoints/step-N/  resumable state
    <run>/metrics.jsonl, metrics.png
    <run>/DONE                 written last: the stage finished and its outputs are complete
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlhf.errors import ConfigError

DONE = "DONE"


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
