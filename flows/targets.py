"""Each search target's chain of steps (retraining, export, registration: the per-target steps of dvc.yaml) as one
task per target on the task runner orchestration.task_runner names (flows/fan_out.py): a target's steps run in order,
each only when DVC finds it out of date (`<step>@<target>` in dvc.yaml), and each is recorded in dvc.lock as `dvc
repro` would record it. One target's failure keeps the others' work; the chain of a target that did not change runs
nothing.
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dna.fan_out import raise_unfinished
from flows import dvc_stages
from flows.fan_out import Job, fan_out, turn, use_threads
from flows.steps import Step


@contextlib.contextmanager
def dvc_turn(root: Path) -> Iterator[None]:
    """One process or thread at a time reads and writes the DVC state of the project (dvc.lock, the cache)."""
    path = root / ".dvc" / "tmp" / "dna-targets.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@task(name="target-chain", task_run_name="target-{target}", cache_policy=NO_CACHE)
def chain_task(root: Path, steps: list[Step], target: str, force: bool, stale: dict[str, list[str]],
               threads: int | None = None, shared_process: bool = True) -> list[str]:
    """A target's steps in order, those DVC finds out of date (all with force); returns the addresses run. `stale`
    is `dvc status` of every stage taken after the steps before the chains: it holds for this chain's steps until
    one of them runs, then each next step is asked again, unless dvc.lock has never recorded it (a new target's)."""
    use_threads(threads)
    ran = []
    with turn(shared_process):
        with dvc_turn(root):
            never_ran = {f"{step.name}@{target}" for step in steps} - dvc_stages.recorded(root)
        try:
            for step in steps:
                address = f"{step.name}@{target}"
                with dvc_turn(root):
                    changed = force or address in never_ran or bool(dvc_stages.out_of_date(root, address) if ran
                                                                    else stale.get(address))
                    if changed:
                        dvc_stages.remove_outputs(root, address)
                if not changed:
                    continue
                step.flow()("params.yaml", None, target=target)
                ran.append(address)
        finally:  # what ran, recorded in one write of dvc.lock (also when a later step failed)
            if ran:
                with dvc_turn(root):
                    dvc_stages.record(root, *ran)
    return ran


@flow(name="dna-targets")
def targets_flow(root: Path, steps: list[Step], targets: list[str], force: bool, stale: dict[str, list[str]],
                 orchestration) -> dict[str, list]:
    """Every target's chain with a step out of date, fanned out (the others start no task); the addresses each ran.
    A lone failure is raised as it was, several as Unfinished naming the targets that failed and those kept."""
    logger = get_run_logger()
    due = due_targets(steps, targets, force, stale)
    for t in targets:
        if t not in due:
            logger.info("target %s: every step is up to date", t)
    gathered = fan_out(orchestration, [Job(t, chain_task, (root, steps, t, force, stale)) for t in due])
    raise_unfinished("targets", "target", gathered.failed, gathered.results)
    return {t: gathered.results.get(t, []) for t in targets}


def due_targets(steps: list[Step], targets: list[str], force: bool, stale: dict[str, list[str]]) -> list[str]:
    """The targets whose chain has a step out of date (all with force)."""
    return [t for t in targets if force or any(stale.get(f"{step.name}@{t}") for step in steps)]


def run_targets(root: Path, steps: list[Step], params, status: dvc_stages.Snapshot,
                force: bool = False) -> dict[str, list]:
    """The chains on the task runner the config names; status: `dvc status` of the pipeline's stages, taken now if
    a step before the chains ran."""
    from flows.prefect_api import share_prefect_api
    from flows.task_runners import make_task_runner

    orch = params.orchestration
    targets = list(params.search.named_targets())
    stale = {} if force else {f"{step.name}@{t}": status.changes(f"{step.name}@{t}") for step in steps
                              for t in targets}
    if not due_targets(steps, targets, force, stale):
        return {t: [] for t in targets}  # nothing to fan out: no flow run
    if orch.task_runner in ("processes", "dask", "ray"):
        share_prefect_api()  # workers in other processes report to this process's Prefect server
    done = targets_flow.with_options(task_runner=make_task_runner(orch))(root, steps, targets, force, stale, orch)
    status.ran()
    return done
