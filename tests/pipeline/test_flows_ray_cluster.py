"""Tasks on Ray hold the resources orchestration.task_resources names (a GPU: Ray's num_gpus, with the task's own
CUDA_VISIBLE_DEVICES), and a request no node can meet stops the flow before any task is submitted. The cluster is
real: a head node started with `ray start` on loopback (the distill flow on such a cluster is in
test_flows_distill.py)."""
from __future__ import annotations

import time

import pytest
from server_support import ray_cluster

from dna.config import ConfigError
from flows.ray_cluster import ResourceRayTaskRunner, missing_resources, ray_options
from flows.settings import OrchestrationConfig
from flows.task_runners import make_task_runner


@pytest.fixture(scope="module")
def one_gpu_two_cpus(tmp_path_factory):
    """Two CPUs but one GPU: only the resource keeps two tasks from running at once."""
    with ray_cluster(tmp_path_factory.mktemp("ray-logs"), gpus=1, cpus=2) as address:
        yield address


def hold_for_a_second() -> dict:
    import os

    start = time.monotonic()
    time.sleep(1.0)
    return {"start": start, "end": time.monotonic(), "devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "pid": os.getpid()}


def run_probes(address: str, resources: dict) -> list[dict]:
    from prefect import flow, task

    probe = task(hold_for_a_second, name="hold-for-a-second")
    runner = make_task_runner(OrchestrationConfig(task_runner="ray", cluster_address=address,
                                                  task_resources=resources))

    @flow(task_runner=runner)
    def probes() -> list[dict]:
        return [f.result() for f in [probe.submit(), probe.submit()]]

    return probes()


def test_each_task_holds_the_gpu_ray_gives_it(prefect_api, one_gpu_two_cpus):
    import os

    held = sorted(run_probes(one_gpu_two_cpus, {"GPU": 1}), key=lambda r: r["start"])
    assert [r["devices"] for r in held] == ["0", "0"]  # Ray set each task's CUDA_VISIBLE_DEVICES to its GPU
    assert held[1]["start"] >= held[0]["end"]  # one GPU: one after the other, though the node has two CPUs
    assert os.getpid() not in {r["pid"] for r in held}

    free = sorted(run_probes(one_gpu_two_cpus, {}), key=lambda r: r["start"])
    assert free[1]["start"] < free[0]["end"]  # without the resource both CPUs work at once


def test_a_resource_no_node_offers_stops_the_flow_before_any_task(prefect_api, one_gpu_two_cpus):
    with pytest.raises(ConfigError, match=r"orchestration.task_resources=\{'GPU': 2.0\}.*'GPU': 1.0"):
        run_probes(one_gpu_two_cpus, {"GPU": 2})


def test_task_resources_as_ray_options():
    assert ray_options({}) == {}
    assert ray_options({"GPU": 1}) == {"num_gpus": 1}
    assert ray_options({"GPU": 0.5, "CPU": 2, "fast_disk": 1}) == {"num_gpus": 0.5, "num_cpus": 2,
                                                                    "resources": {"fast_disk": 1}}


def test_missing_resources_names_what_each_node_offers():
    nodes = [{"NodeManagerAddress": "10.0.0.1", "NodeManagerPort": 1, "Alive": True,
              "Resources": {"CPU": 8.0, "GPU": 1.0, "node:10.0.0.1": 1.0}},
             {"NodeManagerAddress": "10.0.0.2", "NodeManagerPort": 2, "Alive": False, "Resources": {"GPU": 4.0}}]
    assert missing_resources(nodes, {"GPU": 1}) is None
    assert missing_resources(nodes, {}) is None
    reason = missing_resources(nodes, {"GPU": 2})
    assert "10.0.0.1:1: {'CPU': 8.0, 'GPU': 1.0}" in reason and "10.0.0.2" not in reason  # the dead node is left out


def test_a_local_instance_has_max_workers_cpus_and_the_runner_keeps_its_resources():
    runner = make_task_runner(OrchestrationConfig(task_runner="ray", max_workers=3, task_resources={"GPU": 1}))
    assert isinstance(runner, ResourceRayTaskRunner) and runner.init_kwargs["num_cpus"] == 3
    assert runner.address == "local" and runner.task_resources == {"GPU": 1}  # never a cluster left running here
    twin = runner.duplicate()
    assert twin.task_resources == {"GPU": 1} and twin.init_kwargs == runner.init_kwargs
    remote = make_task_runner(OrchestrationConfig(task_runner="ray", cluster_address="10.0.0.1:6379"))
    assert remote.address == "10.0.0.1:6379" and "num_cpus" not in remote.init_kwargs
