"""The figures stage: the pictures of a run, drawn from the tables the stages before it wrote (the Pareto front and
the chosen network, every block's rating spread, the retraining curves). Drawing is a stage of its own so that a
change to how pictures look reruns nothing that trains."""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from dna.errors import needed
from dna.locks import locked

if TYPE_CHECKING:
    from dna.run import Run

log = logging.getLogger(__name__)


@locked("figures")
def stage_figures(run: Run) -> dict:
    import pandas as pd

    from dna import plots

    paths, search = run.paths, run.paths.search_dir
    front = pd.read_csv(needed(search / "front.csv", "search"))
    axis = json.loads(needed(search / "metrics.json", "search").read_text())["front_axis"]
    ratings = [pd.read_csv(needed(paths.rating(b), "rate"), dtype={"path": str}) for b in range(run.space.num_blocks)]
    history = pd.read_csv(needed(paths.retrain_dir / "history.csv", "retrain"))
    targets = pd.read_csv(needed(paths.targets_table, "search"))
    drawn = [plots.front(front, axis, targets, search / "front.png"),
             plots.rating_spread(ratings, search / "rating_spread.png"),
             plots.curves(history, paths.retrain_dir / "curves.png")]
    log.info("figures: %s", ", ".join(str(p) for p in drawn))
    return {"figures": [str(p) for p in drawn]}
