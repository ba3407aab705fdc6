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

    paths, search = run.paths, run.paths.search_dir
    front = pd.read_csv(needed(search / "front.csv", "search"))
    axis = json.loads(needed(search / "metrics.json", "search").read_text())["front_axis"]
    ratings = [pd.read_csv(needed(paths.rating(b), "rate"), dtype={"path": str}) for b in range(run.space.num_blocks)]
    targets = pd.read_csv(needed(paths.targets_table, "search"))
    names = list(targets["target"])
    histories = {t: pd.read_csv(needed(paths.at(t).retrain_dir / "history.csv", "retrain")) for t in names}
    exported = {t: paths.at(t).export_dir / "metrics.json" for t in names}
    accuracy = {t: json.loads(p.read_text())["onnx_test_accuracy"] for t, p in exported.items() if p.is_file()}
    drawn = [plots.front(front, axis, targets, search / "front.png", accuracy),
             plots.rating_spread(ratings, search / "rating_spread.png"),
             plots.curves(histories, search / "curves.png")]
    log.info("figures: %s", ", ".join(str(p) for p in drawn))
    return {"figures": [str(p) for p in drawn]}
