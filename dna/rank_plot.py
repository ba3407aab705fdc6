"""The rank stage's picture: rating against trained accuracy of the networks it trained (a module of its own, so
that the figures stage's pictures, dna/plots.py, rerun no ranking)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from dna.figure_files import plt, save_figure


def ranking(networks: pd.DataFrame, shown: dict[str, str], path: Path) -> Path:
    """Rating against test accuracy (sampled networks by cost band, the searched one, random ones under the budget),
    beside it the single-path one-shot rating (inherited-weight hold-out loss) against the same accuracy, and the
    rating's and the ground truth's own noise: `shown` holds each tau as the report shows it, with its interval."""
    trained = networks[networks["test_accuracy"].notna()]
    spos = "spos_loss" in trained and trained["spos_loss"].notna().any()
    fig, axes = plt.subplots(1, 2 if spos else 1, figsize=(11 if spos else 6, 4.6), squeeze=False)
    panels = [("rating", "rating (sum of block scores, lower is better)", "kendall_tau")]
    if spos:
        panels.append(("spos_loss", "one-shot supernet: inherited-weight hold-out loss", "spos_kendall_tau"))
    for ax, (column, label, tau) in zip(axes[0], panels):
        sampled = trained[trained["sampled"].astype(bool)]
        for band, group in sampled.groupby("band"):
            ax.scatter(group[column], group["test_accuracy"], s=22, label=f"sampled, cost band {band}")
        rand = trained[trained["random"].astype(bool)]
        ax.scatter(rand[column], rand["test_accuracy"], marker="x", color="grey", label="random under budget")
        searched = trained[trained["searched"].astype(bool)]
        ax.scatter(searched[column], searched["test_accuracy"], marker="*", s=160, color="crimson", label="searched")
        ax.set_title(f"Kendall tau {shown[tau]}", fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy, trained from scratch")
    axes[0][0].legend(fontsize=7)
    fig.text(0.01, 0.01, "noise: ground truth (two trainings) tau " + shown["seed_kendall_tau"] +
             "; rating (two distillations) tau " + shown["rating_seed_kendall_tau"] +
             "; intervals: bootstrap 90%", fontsize=7)
    fig.subplots_adjust(bottom=0.2)
    return save_figure(fig, path)

