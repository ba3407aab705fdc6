"""The rate stage: every candidate of every cell of a block rated."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dna.checkpoint import write_csv
from dna.locks import locked
from dna.stages.distill import trained_supernet

if TYPE_CHECKING:
    import pandas as pd

    from dna.run import Run



log = logging.getLogger(__name__)


@locked("rate", per_block=True)
def stage_rate(run: Run, block: int) -> pd.DataFrame:
    from dna.rate import rate_block

    targets = run.supervision.for_rating()
    supernet = trained_supernet(run, block, targets.shapes()).to(run.device)
    table = rate_block(run.space, supernet, targets, block, calibration_size=run.params.rating.calibration_size,
                       batch_size=run.params.rating.batch_size, seed=run.params.seed)
    frame = table.to_frame()
    write_csv(run.paths.rating(block), frame)
    return frame
