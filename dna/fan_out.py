"""Work over several items, one after another in this process (the flows hand the same items to Prefect tasks:
flows/fan_out.py): every item's work runs, and a failure is logged and gathered with the others' instead of stopping
them, so a stage keeps what finished and names what did not."""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable

from dna.errors import StageFailure, exit_code, fails_alike

log = logging.getLogger(__name__)
NOT_RETRIED = " (not retried: it fails the same way on every try)"


def each(jobs: dict[Hashable, Callable[[], object]], what: str,
         log_failures: bool = True) -> tuple[dict, dict[Hashable, BaseException]]:
    """Run every job in order: (results, failures), both keyed as the jobs are; each failure logged when it happens
    (log_failures), or only in what the caller raises at the end."""
    results, failed = {}, {}
    for key, job in jobs.items():
        try:
            results[key] = job()
        except Exception as exc:  # noqa: BLE001 - gathered: the caller names every failure at the end
            if log_failures:
                log.error("%s %s failed: %s: %s", what, key, type(exc).__name__, exc)
            failed[key] = exc
    return results, failed


class Unfinished(StageFailure):
    """Some of a stage's jobs failed (after their retries, none for an error that fails alike on every try); the
    others finished and are kept, and running the stage again redoes only the failed ones."""

    def __init__(self, stage: str, what: str, failed: dict[Hashable, BaseException], kept: Iterable[Hashable],
                 retries: int | None = None):
        self.failed, self.kept = failed, list(kept)
        causes = "; ".join(f"{what} {key}: {type(exc).__name__}: {exc}"
                           + (NOT_RETRIED if retries and fails_alike(exc) else "") for key, exc in failed.items())
        tries = "" if retries is None else f" after {retries} retr{'y' if retries == 1 else 'ies'}"
        names = ", ".join(map(str, self.kept)) if len(self.kept) <= 8 else f"({len(self.kept)})"
        done = f"{what}s {names} finished and are kept" if self.kept else f"no {what} finished"
        super().__init__(f"{stage}: {len(failed)} {what}(s) failed{tries} ({causes}); {done}: running the stage again "
                         f"redoes only the failed {what}s")


def raise_unfinished(stage: str, what: str, failed: dict[Hashable, BaseException], kept: Iterable[Hashable]) -> None:
    """After every job ran: nothing when none failed; a lone failure as it was raised (its exit code and, for a bug,
    its traceback kept); a bug among several failures as it was raised (the others are logged); else Unfinished."""
    if not failed:
        return
    bugs = [exc for exc in failed.values() if exit_code(exc) is None]
    if len(failed) > 1 and not bugs:
        raise Unfinished(stage, what, failed, kept)
    raised = (bugs or list(failed.values()))[0]
    for key, exc in failed.items():
        if exc is not raised:
            log.error("%s: %s %s failed too: %s: %s", stage, what, key, type(exc).__name__, exc)
    raise raised
