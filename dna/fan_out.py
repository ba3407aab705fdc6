"""Work over several items, one after another in this process (the flows hand the same items to Prefect tasks:
flows/fan_out.py): every item's work runs, and a failure is logged and gathered with the others' instead of stopping
them, so a stage keeps what finished and names what did not."""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)


def each(jobs: dict[Hashable, Callable[[], object]], what: str) -> tuple[dict, dict[Hashable, BaseException]]:
    """Run every job in order: (results, failures), both keyed as the jobs are."""
    results, failed = {}, {}
    for key, job in jobs.items():
        try:
            results[key] = job()
        except Exception as exc:  # noqa: BLE001 - gathered: the caller names every failure at the end
            log.error("%s %s failed: %s: %s", what, key, type(exc).__name__, exc)
            failed[key] = exc
    return results, failed
