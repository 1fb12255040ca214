"""Run-directory metrics: `metrics.jsonl` (one flat object per logged step), TensorBoard, `metrics.png`.

Each write is appended and flushed, so a crash loses nothing already logged. On resume the file is
cut back to the checkpoint's step so the resumed run's log reads as if it had never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
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
                 tensorboard: bool = True, title: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.title = title  # of the plot; None: the stage's name (PPO-ptx when the rows hold ptx_loss)
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
        return plot_metrics(self.run_dir, self.stage, self.title) if plot else None


# ---------------------------------------------------------------------------------------------------
# The plot: `<run_dir>/metrics.png`, panels grouped by meaning, one row per group
# ---------------------------------------------------------------------------------------------------
PLOT_FILE = "metrics.png"
STAGE_NAMES = {"sft": "SFT", "rm": "Reward model", "ppo": "PPO"}
STAGE_X_AXIS = {"ppo": "PPO iteration"}  # the others count optimizer steps


@dataclass(frozen=True)
class Panel:
    """One set of axes: `series` are (metric key, legend label) pairs that read together."""

    title: str
    series: tuple[tuple[str, str], ...]
    style: str = "lines"  # "lines"; "stacked": parts of a total; "band": (mean, std) drawn as mean +- std


# Rows of the figure in reading order: what the stage optimises, then its health, then its cost.
# A metric sits in one panel at most; a metric of no panel gets its own panel under "Other".
SECTIONS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    ("Losses", (
        Panel("loss", (("train_loss", "train"), ("val_loss", "validation"))),
        Panel("PPO losses (clipped)", (("pg_loss", "policy"), ("value_loss", "value"))),
        Panel("pretraining loss (ptx NLL)", (("ptx_loss", "ptx"),)),
    )),
    ("Reward model", (
        Panel("pairwise accuracy", (("train_pairwise_accuracy", "train"), ("val_pairwise_accuracy", "validation"))),
        Panel("validation scores (mean ± std)", (("val_score_mean", "mean"), ("val_score_std", "± std")),
              style="band"),
    )),
    ("Reward and KL", (
        Panel("RM score", (("rm_score", "RM"), ("score_with_penalties", "with no-EOS penalty, clip"))),
        Panel("KL to reference (nats per answer)", (("kl_to_ref", "KL"),)),
        Panel("KL coefficient β", (("kl_coef", "β"),)),
    )),
    ("PPO health", (
        Panel("clip fraction", (("clip_frac", "policy"), ("value_clip_frac", "value"))),
        Panel("approx KL, old to new policy", (("approx_kl", "approx KL"),)),
        Panel("entropy (nats per token)", (("entropy", "entropy"),)),
        Panel("explained variance", (("explained_variance", "explained variance"),)),
    )),
    ("Answers", (
        Panel("answer length (tokens)", (("answer_length", "length"),)),
        Panel("answers with no EOS", (("no_eos_frac", "fraction"),)),
    )),
    ("Optimisation", (
        Panel("grad norm (before clipping)", (("grad_norm", "grad norm"),)),
        Panel("learning rate", (("lr", "lr"),)),
        Panel("skipped non-finite steps", (("skipped_steps", "total"),)),
    )),
    ("Throughput", (
        Panel("answer tokens per second", (("tokens_per_s", "tokens/s"),)),
        Panel("time (s)", (("rollout_s", "rollout"), ("score_s", "score"), ("update_s", "update")),
              style="stacked"),
    )),
)
# logged, but another panel already says it: epoch = step / steps per epoch, perplexity = exp(val_loss)
NOT_PLOTTED = frozenset({"epoch", "val_perplexity", "n_demonstrations"})
SUMMARY_KEY = "offset"  # a row holding it is the RM's after-normalisation summary, not a point on a curve

Points = list[tuple[int, float]]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _constant(points: Points) -> bool:
    values = [v for _, v in points]
    return max(values) - min(values) <= 1e-9 * max(abs(v) for v in values)


@dataclass
class PlotLayout:
    """What `metrics_figure` draws: the sections with their drawn panels, and what it only writes down."""

    sections: list[tuple[str, list[Panel]]]  # each panel keeps only the series it draws
    series: dict[str, Points]
    constants: dict[str, float]  # left out: the same value at every logged step, or logged once (last value)
    summary: dict[str, float]  # the values of summary rows (SUMMARY_KEY)


def plot_layout(rows: list[Mapping[str, Any]]) -> PlotLayout:
    """Which panels a stage's rows fill: a panel is drawn when one of its series varies; a series logged
    once is drawn (as a point) only beside a varying one; constant series are written in the footer."""
    series: dict[str, Points] = {}
    summary: dict[str, float] = {}
    for row in rows:
        numbers = {k: v for k, v in row.items() if k not in ("step", "stage") and _is_number(v)}
        if SUMMARY_KEY in row:
            summary.update(numbers)
            continue
        for key, value in numbers.items():
            series.setdefault(key, []).append((int(row["step"]), float(value)))
    varying = {k for k, points in series.items() if not _constant(points)}
    placed = {key for _, panels in SECTIONS for panel in panels for key, _ in panel.series}
    others = tuple(Panel(key, ((key, key),)) for key in sorted(series) if key not in placed | NOT_PLOTTED)
    sections, drawn = [], set()
    for name, panels in (*SECTIONS, ("Other", others)):
        kept = []
        for panel in panels:
            if not any(key in varying for key, _ in panel.series):
                continue
            if panel.style == "lines":  # a flat line says nothing its value does not
                keep = [(k, label) for k, label in panel.series if k in varying or len(series.get(k, ())) == 1]
            else:  # parts of a total, or a mean and its spread: all of them or the picture is wrong
                keep = [(k, label) for k, label in panel.series if k in series]
            kept.append(Panel(panel.title, tuple(keep), panel.style))
            drawn.update(k for k, _ in keep)
        if kept:
            sections.append((name, kept))
    # a summary value equal to its series' last point adds nothing (the RM's accuracy after the shift)
    summary = {k: v for k, v in summary.items() if k not in series or series[k][-1][1] != v}
    constants = {k: points[-1][1] for k, points in sorted(series.items()) if k not in drawn | NOT_PLOTTED}
    return PlotLayout(sections, series, constants, summary)


def _draw_panel(ax, panel: Panel, series: dict[str, Points]) -> None:
    ax.set_title(panel.title, fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    if panel.style == "band":
        (mean_key, mean_label), *spread = panel.series
        steps, means = zip(*series[mean_key])
        line, = ax.plot(steps, means, marker="o", markersize=3, label=mean_label)
        std = dict(series[spread[0][0]]) if spread else {}
        if std and all(s in std for s in steps):
            ax.fill_between(steps, [m - std[s] for s, m in zip(steps, means)],
                            [m + std[s] for s, m in zip(steps, means)], alpha=0.2, color=line.get_color(),
                            label=spread[0][1])
    elif panel.style == "stacked" and len({tuple(s for s, _ in series[k]) for k, _ in panel.series}) == 1:
        steps = [s for s, _ in series[panel.series[0][0]]]
        ax.stackplot(steps, *[[v for _, v in series[k]] for k, _ in panel.series],
                     labels=[label for _, label in panel.series], alpha=0.8)
    else:
        for key, label in panel.series:
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 40 else None, markersize=3)
    if len(panel.series) > 1 and panel.style != "band":  # the band's title says mean +- std
        # above the axes, right of the title: a legend inside hides the points it sits on
        ax.legend(fontsize=8, frameon=False, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(panel.series),
                  borderaxespad=0.1, handlelength=1.2, columnspacing=0.8)


def _footer(layout: PlotLayout, x_axis: str, width: int) -> str:
    import textwrap

    parts = [f"x axis: {x_axis}"]
    if layout.constants:
        parts.append("constant, not plotted: " + ", ".join(f"{k} = {v:.4g}" for k, v in layout.constants.items()))
    if layout.summary:
        parts.append("after normalisation: " + ", ".join(f"{k} = {v:.4g}" for k, v in layout.summary.items()))
    return "\n".join(textwrap.fill(p, width) for p in parts)


def metrics_figure(rows: list[Mapping[str, Any]], title: str, x_axis: str = "step"):
    """The figure for one stage's rows (a matplotlib Figure), or None when nothing varies."""
    layout = plot_layout(rows)
    if not layout.sections:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    from matplotlib.figure import Figure  # not pyplot: no global figure state to leak between runs

    columns = max(len(panels) for _, panels in layout.sections)
    fig = Figure(figsize=(4.0 * columns, 2.6 * len(layout.sections) + 0.9), layout="constrained")
    steps = [s for points in layout.series.values() for s, _ in points]
    for subfig, (name, panels) in zip(fig.subfigures(len(layout.sections), 1, squeeze=False)[:, 0],
                                      layout.sections):
        subfig.suptitle(name, x=0.005, ha="left", fontsize=11, fontweight="bold")
        # a short row spreads over half the width at least: a lone loss panel reads better wide
        axes = subfig.subplots(1, max(len(panels), columns // 2), squeeze=False)[0]
        for ax, panel in zip(axes, panels):
            _draw_panel(ax, panel, layout.series)
            ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)  # every panel on the same steps
        for ax in axes[len(panels):]:
            ax.set_visible(False)
    fig.suptitle(title, fontsize=14)
    fig.supxlabel(_footer(layout, x_axis, width=int(13 * 4.0 * columns)), fontsize=9)  # ~13 characters an inch
    return fig


def plot_title(stage: str, rows: list[Mapping[str, Any]], run_dir: str | os.PathLike) -> str:
    """'PPO-ptx metrics: <run dir name>': the variant is read off the rows (only PPO-ptx logs ptx_loss)."""
    name = STAGE_NAMES.get(stage, stage)
    if stage == "ppo" and any("ptx_loss" in r for r in rows):
        name = "PPO-ptx"
    return f"{name} metrics: {Path(run_dir).resolve().name}"


def plot_metrics(run_dir: str | os.PathLike, stage: str, title: str | None = None) -> Path | None:
    """Draw `stage`'s rows of `run_dir/metrics.jsonl` into `run_dir/metrics.png` (None: nothing to draw)."""
    rows = [r for r in read_metrics(run_dir) if r.get("stage") == stage]
    fig = metrics_figure(rows, title or plot_title(stage, rows, run_dir), STAGE_X_AXIS.get(stage, "optimizer step"))
    if fig is None:
        return None
    out = Path(run_dir) / PLOT_FILE
    fig.savefig(out, dpi=90)
    return out
