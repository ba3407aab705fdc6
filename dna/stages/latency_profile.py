"""The profile stage: every piece of the space timed in ONNX Runtime on this machine."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dna.checkpoint import digest
from dna.locks import locked

if TYPE_CHECKING:
    from dna.spaces.context import SpaceContext

log = logging.getLogger(__name__)


@locked("profile")
def stage_profile(run: SpaceContext) -> dict:
    """Time every candidate layer, the stem and the head in ONNX Runtime on this machine; write the latency table."""
    import time

    from dna.latency import fingerprint, host, profile_space, write_profile

    start = time.perf_counter()
    table = profile_space(run.space, run.params.profile)
    seconds = time.perf_counter() - start
    meta = {"fingerprint": digest(fingerprint(run.space, run.params.profile)), "host": host(),
            "settings": run.params.profile.model_dump(), "rows": len(table), "seconds": round(seconds, 1)}
    write_profile(table, meta, run.paths.profile_dir)
    summary = {"rows": len(table), "seconds": round(seconds, 1), "path": str(run.paths.latency),
               "overhead_ms": float(table.loc[table["kind"] == "overhead", "latency_ms"].iloc[0]),
               "layer_ms_median": float(table.loc[table["kind"] == "layer", "latency_ms"].median())}
    log.info("profile: %d pieces timed in %.1f s -> %s", len(table), seconds, run.paths.latency)
    return summary


# stages -----------------------------------------------------------------------------------------------------------
