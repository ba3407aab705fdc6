"""The one place where the flows fan work out as Prefect tasks (a distill step's blocks, the rank step's networks,
its one-shot baseline and its replicate), on the task runner that orchestration.task_runner names: every job
submitted at once (or each after the one before, for work that must be chained), with orchestration.retries
retries, then every result or failure gathered, so that one job's failure keeps the others' work.

Jobs in one process share torch's global random state, which seeds each block's and network's initial weights:
with the thread runner they take turns (each job's task holds `turn(shared_process=True)` around its work), still
as concurrent tasks; process, Dask and Ray workers each have their own random state and torch thread pool, and
each job gets an equal share of this machine's cores.
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

import contextlib
import os
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from prefect.futures import wait

_TURN = threading.Lock()


def turn(shared_process: bool):
    """The lock that jobs of one process take turns with (a module function, so tasks pickle without it)."""
    return _TURN if shared_process else contextlib.nullcontext()


def use_threads(threads: int | None) -> None:
    """A job's share of the cores, in a worker of its own (None: leave torch's setting)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Job:
    key: Hashable  # what the results and failures are keyed by (a block, a network's id, "spos")
    task: Any  # a Prefect task taking (*args, threads=..., shared_process=...)
    args: tuple = ()


@dataclass
class Gathered:
    results: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)  # key -> the exception, after its retries


def fan_out(orchestration, jobs: list[Job], chained: bool = False) -> Gathered:
    """Submit every job as a task on the flow's task runner (chained: each waits for the one before), wait for
    all, and gather each job's result or its failure."""
    shared = orchestration.task_runner == "threads"  # the jobs share this process (and its torch thread pool)
    workers = min(orchestration.max_workers, len(jobs)) or 1
    threads = None if shared else max(1, (os.cpu_count() or 1) // workers)
    futures = []
    for job in jobs:
        task = job.task.with_options(retries=orchestration.retries, retry_delay_seconds=1)
        after = futures[-1:] if chained else []
        futures.append(task.submit(*job.args, threads=threads, shared_process=shared, wait_for=after))
    wait(futures)
    gathered = Gathered()
    for job, future in zip(jobs, futures):
        try:
            gathered.results[job.key] = future.result()
        except Exception as exc:  # noqa: BLE001 - any failure of a job, after its retries: the caller names them
            gathered.failed[job.key] = exc
    return gathered
