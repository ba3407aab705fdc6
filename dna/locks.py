"""One run at a time of a stage's work on an outputs folder.

A stage holds an exclusive flock on <outputs>/.locks/<stage>.lock (a per-block stage on <stage>.block_<b>.lock)
while it runs. A second run of the same stage, and block, on the same folder stops at once with StageBusy, naming
the holder, instead of interleaving its checkpoints with the first one's; the teacher-feature cache, which every
process that distills prepares alike, is waited for instead (`wait`).

Per stage and block, not one lock per folder: the distill flow trains the blocks of one run at once (threads of one
process, processes, Dask workers, torchrun jobs of `dna distill --block B`), and DNA++ rates block i-1 from inside
block i's distillation; one lock per folder would stop them, or deadlock them if they waited. Different stages
write different files, each atomically, and a stage checks what it reads of another's (fingerprints, the rate
stage's supernet check, the feature cache's marker).

A flock belongs to an open file: two opens conflict even in one process (two threads on one block), and the kernel
drops the lock when its holder dies. The pid and command written into the file only name the holder in the message;
nothing trusts or signals them. Of several torchrun processes, rank 0 holds the lock for them all.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

from dna.errors import StageFailure

log = logging.getLogger(__name__)
LOCK_DIR = ".locks"  # under the outputs folder, beside (never inside) the stages' DVC outputs


class StageBusy(StageFailure):
    """Another run holds the lock of this stage (and block) on this outputs folder."""


def lock_path(root: str | Path, stage: str, block: int | None = None) -> Path:
    return Path(root) / LOCK_DIR / (f"{stage}.lock" if block is None else f"{stage}.block_{block}.lock")


@contextlib.contextmanager
def stage_lock(root: str | Path, stage: str, block: int | None = None, wait: bool = False) -> Iterator[None]:
    """Hold the lock of `stage` (and `block`) on the outputs folder `root`; raise StageBusy when another run holds
    it, or with `wait` wait until it ends."""
    path = lock_path(root, stage, block)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        name, _, target = stage.partition(".target_")
        what = f"the {name} stage{'' if block is None else f' of block {block}'}" \
               f"{f' of target {target}' if target else ''} on {root}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise StageBusy(f"{what} is already running ({holder(fd)}): wait until it ends, or stop it") from None
            log.info("%s is already running (%s): waiting until it ends", what, holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": shlex.join(sys.argv),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: a process forked meanwhile (a data loader) shares the lock
    finally:
        os.close(fd)


def holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (for the message only)."""
    try:
        record = json.loads(os.pread(fd, 65536, 0))
        return f"pid {int(record['pid'])}, `{record['command']}`, since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "which did not record itself yet"


def lock_name(stage: str, replicate: int = 0, target: str | None = None) -> str:
    """The lock of a stage's run: of a replicate's blocks (the rank stage's), or of one search target, its own."""
    name = f"{stage}.replicate_{replicate}" if replicate else stage
    return f"{name}.target_{target}" if target is not None else name


def locked(stage: str, per_block: bool = False, wait: bool = False,
           per_target: bool = False) -> Callable[[Callable], Callable]:
    """Decorate a stage function `fn(run, ...)`, or `fn(run, block, ...)` with `per_block`, to run holding its lock on
    run.paths.root (stage_lock), one per search target with `per_target`. Of several torchrun processes only rank 0
    takes it."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run_locked(run, *args, **kwargs):
            from dna.ddp import is_main

            if not is_main():
                return fn(run, *args, **kwargs)
            block = (args[0] if args else kwargs["block"]) if per_block else None
            replicate = getattr(run, "replicate", 0)  # the rank stage's blocks distilled again write files of their own
            name = lock_name(stage, replicate, run.paths.target if per_target else None)
            with stage_lock(run.paths.root, name, block, wait=wait):
                return fn(run, *args, **kwargs)

        run_locked.stage_lock = stage
        return run_locked
    return decorate
