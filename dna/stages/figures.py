"""The figures stage: the pictures of a run, drawn from the tables the stages before it wrote (the Pareto front with
every target's network, budget and accuracy in ONNX Runtime, every block's rating spread, every target's retraining
curves). Drawing is a stage of its own so that a change to how pictures look reruns nothing that trains."""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from dna.errors import needed
from dna.locks import locked

if TYPE_CHECKING:
    from dna.spaces.context import SpaceContext

log = logging.getLogger(__name__)


@locked("figures")
def stage_figures(run: SpaceContext) -> dict:
    import pandas as pd

    from dna import plots

    paths = run.paths
    front = pd.read_csv(needed(paths.front, "search"))
    axis = json.loads(needed(paths.search_metrics, "search").read_text())["front_axis"]
    ratings = [pd.read_csv(needed(paths.rating(b), "rate"), dtype={"path": str}) for b in range(run.space.num_blocks)]
    targets = pd.read_csv(needed(paths.targets_table, "search"))
    names = list(targets["target"])
    histories = {t: pd.read_csv(needed(paths.at(t).retrain_history, "retrain")) for t in names}
    exported = {t: paths.at(t).export_metrics for t in names}
    accuracy = {t: json.loads(p.read_text())["onnx_test_accuracy"] for t, p in exported.items() if p.is_file()}
    drawn = [plots.front(front, axis, targets, paths.front_plot, accuracy),
             plots.rating_spread(ratings, paths.spread_plot), plots.curves(histories, paths.curves_plot)]
    log.info("figures: %s", ", ".join(str(p) for p in drawn))
    return {"figures": [str(p) for p in drawn]}
