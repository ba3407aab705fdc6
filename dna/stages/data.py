"""The data stage: fixed, seeded, stratified, disjoint train / rate / test splits."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dna.checkpoint import write_json
from dna.locks import locked

if TYPE_CHECKING:
    from dna.context import Context

log = logging.getLogger(__name__)


@locked("data")
def stage_data(run: Context) -> dict:
    from dna.data import write_splits

    summary = write_splits(run.params.data, run.params.seed, run.paths.splits)
    log.info("data: %s", summary["sizes"])
    metrics = {f"{split}_images": n for split, n in summary["sizes"].items()} | {"num_classes": summary["num_classes"]}
    write_json(run.paths.data_metrics, metrics)
    return metrics | summary
