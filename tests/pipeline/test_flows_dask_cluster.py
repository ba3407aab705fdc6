"""Tasks on a Dask cluster given by address hold the worker resources orchestration.task_resources names, and a
request no worker can meet stops the flow before any task is submitted. The cluster is real: `dask scheduler` and
`dask worker` processes on loopback (the distill flow's fan-out over such a cluster is in test_flows_distill.py)."""
from __future__ import annotations

import time

import pytest
from server_support import dask_cluster

from dna.errors import ConfigError
from flows.dask_cluster import missing_resources
from flows.settings import OrchestrationConfig
from flows.task_runners import make_task_runner


@pytest.fixture(scope="module")
def one_gpu_two_threads(tmp_path_factory):
    """One worker with two threads but one GPU: only the resource keeps two tasks from running at once on it."""
    with dask_cluster(tmp_path_factory.mktemp("dask-logs"), gpus=1, threads=2) as (address, workers):
        yield address, workers


def hold_for_a_second() -> dict:
    from distributed import get_worker

    start = time.monotonic()
    free = dict(get_worker().state.available_resources)
    time.sleep(1.0)
    return {"start": start, "end": time.monotonic(), "free_gpus": free.get("GPU")}


def run_probes(address: str, resources: dict) -> list[dict]:
    from prefect import flow, task

    probe = task(hold_for_a_second, name="hold-for-a-second")
    runner = make_task_runner(OrchestrationConfig(task_runner="dask", cluster_address=address,
                                                  task_resources=resources))

    @flow(task_runner=runner)
    def probes() -> list[dict]:
        return [f.result() for f in [probe.submit(), probe.submit()]]

    return probes()


def test_each_task_holds_the_gpu_of_its_worker(prefect_api, one_gpu_two_threads):
    address, _ = one_gpu_two_threads
    held = sorted(run_probes(address, {"GPU": 1}), key=lambda r: r["start"])
    assert [r["free_gpus"] for r in held] == [0, 0]  # the worker's one GPU was taken while each ran
    assert held[1]["start"] >= held[0]["end"]  # so they ran one after the other, though the worker has two threads

    free = sorted(run_probes(address, {}), key=lambda r: r["start"])
    assert [r["free_gpus"] for r in free] == [1, 1]
    assert free[1]["start"] < free[0]["end"]  # without the resource both threads work at once


def test_a_resource_no_worker_offers_stops_the_flow_before_any_task(prefect_api, one_gpu_two_threads):
    address, workers = one_gpu_two_threads
    with pytest.raises(ConfigError, match=r"orchestration.task_resources=\{'GPU': 2.0\}.*GPU=1"):
        run_probes(address, {"GPU": 2})


def test_missing_resources_names_what_each_worker_offers():
    workers = {"tcp://a:1": {"resources": {"GPU": 1}}, "tcp://b:2": {"resources": {}}}
    assert missing_resources(workers, {"GPU": 1}) is None
    assert missing_resources(workers, {}) is None
    assert missing_resources({}, {"GPU": 1}) is None  # no worker yet: they may still be starting
    reason = missing_resources(workers, {"GPU": 1, "MEM": 4})
    assert "tcp://a:1: {'GPU': 1}" in reason and "tcp://b:2: none" in reason


def test_a_local_cluster_offers_the_resources_its_tasks_hold():
    runner = make_task_runner(OrchestrationConfig(task_runner="dask", max_workers=2, task_resources={"GPU": 1}))
    assert runner.cluster_kwargs["resources"] == {"GPU": 1} and runner.task_resources == {"GPU": 1}
    assert runner.duplicate().task_resources == {"GPU": 1}
    with pytest.raises(Exception, match="task_resources"):
        OrchestrationConfig(task_runner="dask", task_resources={"GPU": 0})


def test_a_local_cluster_listens_on_loopback_only():
    """A Dask scheduler runs whatever its clients send, and its workers too: a local cluster of processes is asked
    for 127.0.0.1 explicitly (distributed's own default today), and gets it; one of threads uses no socket."""
    from distributed import LocalCluster

    runner = make_task_runner(OrchestrationConfig(task_runner="dask", max_workers=1), dask_processes=True)
    assert runner.cluster_kwargs["host"] == "127.0.0.1"
    with LocalCluster(**runner.cluster_kwargs) as cluster:
        addresses = [cluster.scheduler_address, *(w.worker_address for w in cluster.workers.values())]
    assert len(addresses) == 2 and all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses

    threads = make_task_runner(OrchestrationConfig(task_runner="dask", max_workers=1), dask_processes=False)
    with LocalCluster(**threads.cluster_kwargs) as cluster:
        assert cluster.scheduler_address.startswith("inproc://")
