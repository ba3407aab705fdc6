"""The tables the search combines: the stem's, every block's and the head's candidates with their costs, and their
latency from this machine's profile or a device's (search.targets.<name>.latency_profile)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from dna.checkpoint import digest
from dna.errors import ConfigError

if TYPE_CHECKING:
    from dna.config import TargetConfig
    from dna.spaces.base import Candidates, SearchSpace
    from dna.spaces.context import SpaceContext

log = logging.getLogger(__name__)


def latency_model(run: SpaceContext):
    """The machine's latency profile of this space (a dna.latency.LatencyTable), or None when there is none.

    Raises ConfigError, naming the key, when search.budgets or search.front_axis asks for latency_ms and the profile
    is missing or was measured for another space, input or profile settings.
    """
    from dna.latency import LatencyTable, fingerprint

    keys, path = run.params.search.latency_keys(), run.paths.latency
    meta = run.paths.profile_record
    if not path.is_file() or not meta.is_file():
        if keys:
            raise ConfigError(f"{keys[0]} asks for latency_ms, but this run has no latency profile ({path} is "
                              f"missing): run `dna profile` first, on the machine the network will run on")
        return None
    if json.loads(meta.read_text()).get("fingerprint") != digest(fingerprint(run.space, run.params.profile)):
        if keys:
            raise ConfigError(f"{keys[0]} asks for latency_ms, but the latency profile {path} was measured for "
                              f"another space, input size or profile settings: run `dna profile` again")
        log.warning("latency profile %s is stale (another space or settings): not used", path)
        return None
    return LatencyTable.load(path)


def target_latency(run: SpaceContext, target: TargetConfig, local):
    """A target's latency model: the profile its device wrote (target.latency_profile), or this machine's (`local`,
    from latency_model)."""
    if target.latency_profile is None:
        return local
    from dna.latency import device_profile

    return device_profile(Path(target.latency_profile), run.space)


def stage_tables(space: SearchSpace, ratings: list[Candidates] | None = None, scored: bool = True,
                 latency=None) -> list[Candidates]:
    """Stem, block and head tables for the search; with a latency profile (LatencyTable), their latency."""
    blocks = ratings if ratings is not None else [space.candidate_table(b) for b in range(space.num_blocks)]
    stages = [space.stem_table(), *blocks, space.head_table()]
    return latency.annotate(space, stages) if latency is not None else stages
