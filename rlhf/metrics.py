"""Run-directory metrics: `metrics.jsonl` (one flat object per logged step), TensorBoard, a PNG plot.

Each write is appended and flushed, so a crash loses nothing already logged. On resume the file is
cut back to the checkpoint's step so the resumed run's log reads as if it had never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger("rlhf.metrics")

METRICS_FILE = "metrics.jsonl"


def _to_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()  # note: a CPU-GPU sync point, once per log step
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


def postfix(row: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, str]:
    """The progress bar's live values from a logged row (a non-finite value is logged as the string "nan")."""
    return {k: f"{row[k]:.3f}" if isinstance(row[k], (int, float)) else str(row[k]) for k in keys if k in row}


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut off by a crash: everything after it is lost anyway
    return rows


class MetricsLogger:
    """Append metrics for one stage to `run_dir/metrics.jsonl` (and TensorBoard when installed)."""

    def __init__(self, run_dir: str | os.PathLike, stage: str, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self._truncate_after(-1)  # a fresh run of this stage starts a fresh log
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.debug("tensorboard not installed; metrics go to %s only", self.path)
            else:
                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Keep the other stages' rows and this stage's rows up to `step`."""
        kept = [r for r in read_metrics(self.run_dir)
                if r.get("stage") != self.stage or r.get("step", -1) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        row = {"stage": self.stage, "step": int(step)}
        row.update({k: _to_float(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(f"{self.stage}/{key}", value, step)
        return row

    def close(self, plot: bool = True) -> Path | None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        return plot_metrics(self.run_dir, self.stage) if plot else None


def plot_metrics(run_dir: str | os.PathLike, stage: str) -> Path | None:
    """One panel per metric of `stage`, against step: `run_dir/<stage>_metrics.png`."""
    rows = [r for r in read_metrics(run_dir) if r.get("stage") == stage]
    keys = sorted({k for r in rows for k, v in r.items()
                   if k not in ("step", "stage") and isinstance(v, (int, float))})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{stage} metrics")
    fig.tight_layout()
    out = Path(run_dir) / f"{stage}_metrics.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
