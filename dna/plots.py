"""Pictures people would rather see than read: the Pareto front, rating spread per block, training curves, and
rating against accuracy of the networks the ranking stage trained."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, path: Path) -> Path:
    from dna.checkpoint import staged_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def front(table: pd.DataFrame, axis: str, chosen: pd.Series, path: Path) -> Path:
    """The Pareto front (search/front.csv) of rating against `axis`, and the chosen network (its row) on it."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(table[axis], table["score"], where="post", marker=".", label="Pareto front")
    ax.scatter([chosen[axis]], [chosen["score"]], color="crimson", zorder=3, s=60, label="chosen")
    ax.set_xlabel(axis)
    ax.set_ylabel("rating (sum of block scores, lower is better)")
    ax.set_title("Rating versus cost")
    ax.legend()
    return _save(fig, path)


def rating_spread(tables: list[pd.DataFrame], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.boxplot([t.drop_duplicates(["cell", "path"])["score"] for t in tables])
    ax.set_xticks(range(1, len(tables) + 1), [f"block {i}" for i in range(len(tables))])
    ax.set_ylabel("score: mean |Y - Y_hat| / std(Y)")
    ax.set_title("Candidate scores per block")
    return _save(fig, path)


def curves(history: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["loss"], label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    right = ax.twinx()
    right.plot(history["epoch"], history["rate_accuracy"], color="tab:green", label="hold-out accuracy")
    right.set_ylabel("accuracy")
    fig.legend(loc="upper right")
    return _save(fig, path)


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
    return _save(fig, path)

