"""Pictures people would rather see than read, drawn by the figures stage: the Pareto front, rating spread per block
and training curves (the rank stage's picture is dna/rank_plot.py's: how these look reruns no training stage)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from dna.figure_files import plt, save_figure


def front(table: pd.DataFrame, axis: str, targets: pd.DataFrame, path: Path,
          accuracy: dict[str, float] | None = None) -> Path:
    """The Pareto front (search/front.csv) of rating against `axis`, and every target's network (search/targets.csv)
    with its budget on `axis` and, once exported, its test accuracy in ONNX Runtime (`accuracy`, by target)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.step(table[axis], table["score"], where="post", marker=".", color="tab:blue", label="Pareto front")
    for i, row in enumerate(targets.itertuples(index=False)):
        color = f"C{(i + 1) % 10}"
        ax.scatter([getattr(row, axis)], [row.score], color=color, zorder=3, s=60,
                   label=row.target + (f": accuracy {accuracy[row.target]:.4f}" if accuracy and row.target in
                                       accuracy else ""))
        budget = getattr(row, f"budget_{axis}", None)
        if budget is not None and budget == budget:  # a budget on this axis (NaN: none)
            ax.axvline(budget, color=color, linestyle=":", linewidth=1)
    ax.set_xlabel(axis)
    ax.set_ylabel("rating (sum of block scores, lower is better)")
    ax.set_title("Rating versus cost: each target's network and budget (dotted)")
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def rating_spread(tables: list[pd.DataFrame], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.boxplot([t.drop_duplicates(["cell", "path"])["score"] for t in tables])
    ax.set_xticks(range(1, len(tables) + 1), [f"block {i}" for i in range(len(tables))])
    ax.set_ylabel("score: mean |Y - Y_hat| / std(Y)")
    ax.set_title("Candidate scores per block")
    return save_figure(fig, path)


def curves(histories: dict[str, pd.DataFrame], path: Path) -> Path:
    """Each target's retraining: its training loss and hold-out accuracy per epoch, side by side."""
    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories) + 1.5, 4), squeeze=False)
    for ax, (target, history) in zip(axes[0], histories.items()):
        ax.plot(history["epoch"], history["loss"], label="training loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title(f"target {target}")
        right = ax.twinx()
        right.plot(history["epoch"], history["rate_accuracy"], color="tab:green", label="hold-out accuracy")
        right.set_ylabel("accuracy")
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    fig.legend(handles, [h.get_label() for h in handles], loc="upper right")
    return save_figure(fig, path)
