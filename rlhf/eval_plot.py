"""Gold score against KL to SFT for every row of an evaluation: does RL beat best-of-n at matched KL?

One PNG: the SFT policy at KL 0; best-of-n as a line (at its measured KL, and its analytic bound as a
dashed line); SFT at lower temperatures as a line; every RL policy (or checkpoint) as a labelled point.
Vertical bars are the 95% bootstrap intervals of the gold score.
"""

from __future__ import annotations

import os
from pathlib import Path

STYLE = {"sft": ("black", "s"), "best_of_n": ("tab:blue", "o"), "temperature": ("tab:green", "^"),
         "policy": ("tab:red", "D")}


def plot_gold_vs_kl(result: dict, path: str | os.PathLike, title: str = "") -> Path | None:
    """Write the plot of `result` (an `rlhf eval` result dict) to `path`; None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rows = [(name, row) for name, row in result["policies"].items() if row.get("gold_score") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def series(kind: str) -> list[tuple[str, dict]]:
        chosen = [(n, r) for n, r in rows if r["kind"] == kind]
        return sorted(chosen, key=lambda item: item[1]["kl_to_sft"])

    def errorbars(items, color, marker, label, x_key="kl_to_sft", **style):
        xs = [r[x_key] for _, r in items]
        ys = [r["gold_score"] for _, r in items]
        err = [[r["gold_score"] - r["gold_ci"][0] for _, r in items], [r["gold_ci"][1] - r["gold_score"] for _, r in items]]
        ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, label=label, capsize=3, **style)

    sft = series("sft")
    bon = sorted(series("best_of_n"), key=lambda item: item[1]["n"])
    colder = sorted(series("temperature"), key=lambda item: -item[1]["temperature"])
    policies = series("policy")
    if bon:
        errorbars(sft + bon, *STYLE["best_of_n"], "best-of-n by the RM (measured KL)")
        ax.plot([0.0] + [r["kl_bound"] for _, r in bon], [sft[0][1]["gold_score"]] + [r["gold_score"] for _, r in bon],
                color=STYLE["best_of_n"][0], linestyle="--", alpha=0.5, label="best-of-n at its KL bound")
        for _, r in bon:
            ax.annotate(f"n={r['n']}", (r["kl_to_sft"], r["gold_score"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7, color=STYLE["best_of_n"][0])
    if colder:
        errorbars(sft + colder, *STYLE["temperature"], "SFT at lower temperature")
        for _, r in colder:
            ax.annotate(f"T={r['temperature']:g}", (r["kl_to_sft"], r["gold_score"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=STYLE["temperature"][0])
    if sft:
        errorbars(sft, *STYLE["sft"], "SFT (T=1)", linestyle="none")
    if policies:
        errorbars(policies, *STYLE["policy"], "RL policies", linestyle="none")
        for name, r in policies:
            ax.annotate(name, (r["kl_to_sft"], r["gold_score"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=STYLE["policy"][0])
    ax.set_xlabel("KL to SFT (nats per answer)")
    ax.set_ylabel("gold score (mean, 95% CI over prompts)")
    ax.set_title(title or f"gold vs KL on {result.get('n_prompts', '?')} {result.get('part', 'held-out')} prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
