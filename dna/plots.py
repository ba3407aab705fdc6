"""Pictures people would rather see than read: the Pareto front, rating spread per block, training curves."""
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


def front(table: pd.DataFrame, axis: str, chosen, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(table[axis], table["score"], where="post", marker=".", label="Pareto front")
    ax.scatter([chosen.costs[axis]], [chosen.score], color="crimson", zorder=3, s=60, label="chosen")
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
