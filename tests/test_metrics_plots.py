"""`metrics.png`: one file per stage run dir, panels grouped by meaning, constant series left out (and
written in the footer), a title naming the stage and its variant, and no text drawn over other text."""

from __future__ import annotations

import itertools
import math

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from rlhf.metrics import MetricsLogger, metrics_figure, plot_layout, plot_metrics, plot_title, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ppo_rows(steps: int = 6, ptx: bool = False, adaptive_kl: bool = False) -> list[dict]:
    """Rows shaped like the PPO loop's: a fixed lr, no skipped steps, the KL coefficient fixed unless adaptive."""
    rows = []
    for step in range(1, steps + 1):
        row = {"stage": "ppo", "step": step, "rm_score": 0.1 * step, "score_with_penalties": 0.1 * step - 0.2,
               "kl_to_ref": 0.01 * step ** 2, "kl_coef": 0.02 * (0.99 ** step if adaptive_kl else 1.0),
               "answer_length": 5.0 + step % 3, "no_eos_frac": 0.5 / step, "explained_variance": -1 + 0.1 * step,
               "clip_frac": 0.01 * (step % 2), "approx_kl": 1e-4 * step, "entropy": 3.5 - 0.01 * step,
               "value_clip_frac": 0.0, "pg_loss": -0.01 * step, "value_loss": 0.3 / step,
               "grad_norm": 2.0 + math.sin(step), "tokens_per_s": 400.0 + step, "rollout_s": 0.03 + 0.001 * step,
               "score_s": 0.02, "update_s": 0.05 - 0.001 * step, "lr": 5e-5, "skipped_steps": 0}
        if ptx:
            row["ptx_loss"] = 3.0 - 0.05 * step
        rows.append(row)
    return rows


def panels(layout) -> dict[str, dict[str, list[str]]]:
    """{section: {panel title: [metric keys drawn]}}"""
    return {name: {p.title: [k for k, _ in p.series] for p in ps} for name, ps in layout.sections}


@pytest.mark.parametrize("stage, row", [
    ("sft", {"train_loss": 2.0, "lr": 1e-3}), ("rm", {"train_loss": 0.7, "train_pairwise_accuracy": 0.6}),
    ("ppo", {"rm_score": 0.1, "kl_to_ref": 0.2})])
def test_each_stage_writes_metrics_png_in_its_own_run_dir(tmp_path, stage, row):
    run_dir = tmp_path / stage
    logger = MetricsLogger(run_dir, stage, tensorboard=False)
    for step in range(1, 4):
        logger.log(step, {k: v * step for k, v in row.items()})
    assert logger.close() == run_dir / "metrics.png"
    assert (run_dir / "metrics.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "metrics.png"]  # no <stage>_metrics.png


def test_ppo_panels_are_grouped_by_meaning_and_constant_series_are_left_out():
    layout = plot_layout(ppo_rows(ptx=True))
    assert panels(layout) == {
        "Losses": {"PPO losses (clipped)": ["pg_loss", "value_loss"], "pretraining loss (ptx NLL)": ["ptx_loss"]},
        "Reward and KL": {"RM score": ["rm_score", "score_with_penalties"],
                          "KL to reference (nats per answer)": ["kl_to_ref"]},
        "PPO health": {"clip fraction": ["clip_frac"], "approx KL, old to new policy": ["approx_kl"],
                       "entropy (nats per token)": ["entropy"], "explained variance": ["explained_variance"]},
        "Answers": {"answer length (tokens)": ["answer_length"], "answers with no EOS": ["no_eos_frac"]},
        "Optimisation": {"grad norm (before clipping)": ["grad_norm"]},
        "Throughput": {"answer tokens per second": ["tokens_per_s"],
                       "time (s)": ["rollout_s", "score_s", "update_s"]},  # a constant part of a total stays
    }
    # a fixed KL coefficient, a flat lr, no skipped steps, a value clip that never fired: footer values
    assert layout.constants == {"kl_coef": 0.02, "lr": 5e-5, "skipped_steps": 0, "value_clip_frac": 0.0}
    fig = metrics_figure(ppo_rows(ptx=True), "t")
    assert "constant, not plotted: kl_coef = 0.02, lr = 5e-05, skipped_steps = 0" in fig._supxlabel.get_text()


def test_an_adaptive_kl_coefficient_gets_its_panel_beside_the_kl():
    layout = plot_layout(ppo_rows(adaptive_kl=True))
    assert panels(layout)["Reward and KL"]["KL coefficient β"] == ["kl_coef"]
    assert "kl_coef" not in layout.constants


def test_train_and_validation_loss_share_a_panel_even_with_one_validation_point():
    rows = [{"stage": "sft", "step": s, "train_loss": 3.0 - 0.1 * s, "lr": 1e-3 * s, "epoch": s / 4,
             "skipped_steps": 0} for s in range(1, 5)]
    rows[-1].update(val_loss=2.5, val_perplexity=math.exp(2.5))  # evaluated once, at the end of the epoch
    layout = plot_layout(rows)
    assert panels(layout) == {"Losses": {"loss": ["train_loss", "val_loss"]},
                              "Optimisation": {"learning rate": ["lr"]}}
    # epoch and perplexity are other panels' numbers in other units: neither drawn nor listed
    assert layout.constants == {"skipped_steps": 0}


def test_rm_summary_row_after_normalisation_is_written_not_drawn():
    rows = [{"stage": "rm", "step": s, "train_loss": 0.7 - 0.01 * s, "val_pairwise_accuracy": 0.5 + 0.05 * s,
             "val_score_mean": 1.0 - 0.1 * s, "val_score_std": 0.2} for s in (2, 4)]
    rows.append({"stage": "rm", "step": 4, "val_pairwise_accuracy": 0.7, "val_score_mean": 0.0,
                 "val_score_std": 0.2, "offset": -0.6, "demo_score_mean_before": 0.6})
    layout = plot_layout(rows)
    assert panels(layout)["Reward model"] == {"pairwise accuracy": ["val_pairwise_accuracy"],
                                              "validation scores (mean ± std)": ["val_score_mean", "val_score_std"]}
    assert [v for _, v in layout.series["val_score_mean"]] == [0.8, 0.6]  # the summary row is no point
    # the accuracy is unchanged by the shift, so only what moved is written
    assert layout.summary == {"val_score_mean": 0.0, "offset": -0.6, "demo_score_mean_before": 0.6}


def test_a_metric_of_no_panel_gets_its_own_under_other():
    rows = [{"stage": "sft", "step": s, "train_loss": 1.0 / s, "my_metric": float(s)} for s in (1, 2)]
    assert panels(plot_layout(rows))["Other"] == {"my_metric": ["my_metric"]}


def test_nothing_varying_draws_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, "sft", tensorboard=False)
    logger.log(1, {"train_loss": 1.0})
    assert logger.close() is None and not (tmp_path / "metrics.png").exists()


def test_title_names_the_stage_and_the_ppo_variant(tmp_path):
    assert plot_title("ppo", ppo_rows(ptx=True), tmp_path / "ppo_ptx") == "PPO-ptx metrics: ppo_ptx"
    assert plot_title("ppo", ppo_rows(), tmp_path / "ppo") == "PPO metrics: ppo"
    assert plot_title("rm", [], tmp_path / "rm") == "Reward model metrics: rm"
    assert plot_title("sft", [], tmp_path / "run") == "SFT metrics: run"
    logger = MetricsLogger(tmp_path, "ppo", tensorboard=False)
    for row in ppo_rows(ptx=True):
        logger.log(row["step"], {k: v for k, v in row.items() if k not in ("stage", "step")})
    logger.close(plot=False)
    drawn = metrics_figure(read_metrics(tmp_path), plot_title("ppo", read_metrics(tmp_path), tmp_path))
    assert drawn._suptitle.get_text() == f"PPO-ptx metrics: {tmp_path.name}"
    assert plot_metrics(tmp_path, "ppo", title="my title") == tmp_path / "metrics.png"


def test_no_title_legend_or_section_name_overlaps_another_text_or_axis():
    fig = metrics_figure(ppo_rows(ptx=True, adaptive_kl=True), "PPO-ptx metrics: ppo_ptx")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lays the figure out (constrained layout) so the extents are final
    renderer = canvas.get_renderer()
    # matplotlib keeps these artists in private attributes; their text is what this test is about
    texts = [fig._suptitle, fig._supxlabel] + [sub._suptitle for sub in fig.subfigs]
    for ax in fig.axes:
        if ax.get_visible():
            texts.append(ax._left_title)  # the panel titles sit on the left (legends on the right)
            if ax.get_legend() is not None:
                texts.append(ax.get_legend())
    axes = [axis for ax in fig.axes if ax.get_visible() for axis in (ax.xaxis, ax.yaxis)]  # with tick labels
    boxes = [t.get_window_extent(renderer) for t in texts] + [axis.get_tightbbox(renderer) for axis in axes]
    assert len(texts) > 20
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        if i < len(texts):  # text against text and against every panel's axes; axes may touch each other
            assert not a.overlaps(b), ((texts + axes)[i], (texts + axes)[j])
