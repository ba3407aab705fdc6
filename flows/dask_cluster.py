"""Block tasks on a Dask cluster that hold worker resources while they run: with one worker per GPU, each started
with `--resources GPU=1` and its own CUDA_VISIBLE_DEVICES, and `orchestration.task_resources: {GPU: 1}`, every
block runs alone on its worker's GPU. Before any block is submitted, the cluster's workers are checked: a request
that no connected worker can meet stops the flow instead of leaving its tasks waiting for ever."""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

from collections.abc import Mapping

import dask
from prefect_dask import DaskTaskRunner

from dna.errors import ConfigError


def missing_resources(workers: Mapping[str, dict], needed: Mapping[str, float]) -> str | None:
    """Why no worker (scheduler_info()["workers"]) can run a task that holds `needed`; None if one can (or if no
    worker has joined yet: workers may still be starting)."""
    if not needed or not workers:
        return None
    offered = {addr: dict(info.get("resources") or {}) for addr, info in workers.items()}
    if any(all(have.get(k, 0) >= v for k, v in needed.items()) for have in offered.values()):
        return None
    listing = "; ".join(f"{addr}: {have or 'none'}" for addr, have in sorted(offered.items()))
    return (f"orchestration.task_resources={dict(needed)} but no worker of the cluster offers them (workers and their "
            f"resources: {listing}); start workers with `dask worker ADDRESS --resources GPU=1`, or change the key")


class ResourceDaskTaskRunner(DaskTaskRunner):
    """prefect-dask's task runner; each task it submits holds `task_resources` of the worker that runs it."""

    def __init__(self, *args, task_resources: Mapping[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.task_resources = dict(task_resources or {})

    def duplicate(self):
        twin = super().duplicate()
        twin.task_resources = dict(self.task_resources)
        return twin

    def __enter__(self):
        super().__enter__()
        if self.task_resources:
            try:
                reason = missing_resources(self.client.scheduler_info(n_workers=-1)["workers"], self.task_resources)
                if reason:
                    raise ConfigError(reason)
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        if not self.task_resources:
            return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)
        with dask.annotate(resources=self.task_resources):
            return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)
