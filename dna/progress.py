"""Progress of long loops: a tqdm bar in a terminal; in a log file (DVC's output, a Prefect worker, CI) one line
per minute instead of thousands of carriage-return updates. The end of each epoch is logged by the trainers."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
LOG_EVERY_S = 60.0


def interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "") in ("", "0", "false")


class LoggedProgress:
    """The part of tqdm's interface the trainers use, writing a log line at most every `every` seconds."""

    def __init__(self, iterable: Iterable[T], desc: str, total: int | None = None, every: float = LOG_EVERY_S):
        self.iterable, self.desc, self.every = iterable, desc, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix: dict[str, str] = {}

    def set_postfix(self, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def __iter__(self) -> Iterator[T]:
        start = last = time.monotonic()
        for step, item in enumerate(self.iterable, 1):
            yield item
            now = time.monotonic()
            if now - last >= self.every:
                last = now
                of = f"/{self.total}" if self.total else ""
                extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
                log.info("%s: step %d%s after %.0f s%s", self.desc, step, of, now - start, extra)


def progress(iterable: Iterable[T], desc: str, total: int | None = None, disable: bool = False):
    """A tqdm bar when stderr is a terminal, else a LoggedProgress (nothing at all when disabled)."""
    if disable:
        return LoggedProgress(iterable, desc, total, every=float("inf"))
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
    return LoggedProgress(iterable, desc, total)
