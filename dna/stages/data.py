"""The data stage: fixed, seeded, stratified, disjoint train / rate / test splits."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dna.locks import locked

if TYPE_CHECKING:
    from dna.run import Run

log = logging.getLogger(__name__)


@locked("data")
def stage_data(run: Run) -> dict:
    from dna.data import write_splits

    summary = write_splits(run.params.data, run.params.seed, run.paths.splits)
    log.info("data: %s", summary["sizes"])
    return summary
