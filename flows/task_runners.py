"""The Prefect task runner named by orchestration.task_runner."""
from __future__ import annotations

import os

from dna.errors import ConfigError
from flows.settings import OrchestrationConfig


def make_task_runner(orch: OrchestrationConfig, dask_processes: bool | None = None):
    """The Prefect task runner named by orchestration.task_runner.

    dask: a LocalCluster of max_workers single-threaded workers, or the cluster at orchestration.cluster_address;
    each task holds orchestration.task_resources of its worker (e.g. {GPU: 1}: one block per GPU worker; the local
    cluster's workers then offer them too).
    ray: a local Ray instance of max_workers CPUs, or the cluster at orchestration.cluster_address; each task holds
    orchestration.task_resources (flows/ray_cluster.py).
    dask_processes=False runs the local cluster's workers as threads of this process (the env variable
    DNA_DASK_PROCESSES=0 does the same); by default they are processes.
    """
    kind = orch.task_runner
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=orch.max_workers)
    if kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=orch.max_workers)
    if kind == "dask":
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # workers' startup chatter, also in workers
        try:
            import dask

            dask.config.refresh()
            from flows.dask_cluster import ResourceDaskTaskRunner
        except ImportError:
            raise ConfigError("orchestration.task_runner='dask' needs prefect-dask: pip install prefect-dask") from None
        resources = dict(orch.task_resources)
        if orch.cluster_address:
            return ResourceDaskTaskRunner(address=orch.cluster_address, task_resources=resources)
        if dask_processes is None:
            dask_processes = os.environ.get("DNA_DASK_PROCESSES", "1") not in ("0", "false", "no")
        local = {"n_workers": orch.max_workers, "threads_per_worker": 1, "processes": dask_processes,
                 "dashboard_address": None}
        if dask_processes:  # scheduler and workers run what they are sent: loopback only (threads use no socket)
            local["host"] = "127.0.0.1"
        return ResourceDaskTaskRunner(cluster_class="distributed.LocalCluster", task_resources=resources,
                                      cluster_kwargs=local | ({"resources": resources} if resources else {}))
    if kind == "ray":
        try:
            from flows.ray_cluster import make_ray_task_runner
        except ImportError:
            raise ConfigError("orchestration.task_runner='ray' needs prefect-ray, which is not installed: "
                              'pip install -e ".[ray]" (or choose threads, processes or dask)') from None
        return make_ray_task_runner(orch.cluster_address, orch.max_workers, orch.task_resources)
    raise ConfigError(f"orchestration.task_runner={kind!r}; allowed: threads, processes, dask, ray")
