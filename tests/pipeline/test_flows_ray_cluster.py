"""Tasks on Ray hold the resources orchestration.task_resources names (a GPU: Ray's num_gpus, with the task's own
CUDA_VISIBLE_DEVICES), and a request no node can meet stops the flow before any task is submitted. The cluster is
real: a head node started with `ray start` on loopback (the distill flow on such a cluster is in
test_flows_distill.py)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from server_support import ray_cluster

from dna.errors import ConfigError
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


def test_ray_runs_only_with_token_auth_and_a_token_only_its_owner_can_read(tmp_path, monkeypatch):
    from flows.ray_cluster import require_token_auth

    with pytest.raises(ConfigError, match="RAY_AUTH_MODE='disabled'.*needs RAY_AUTH_MODE=token"):
        require_token_auth({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "t"}, local=True)
    shared = tmp_path / "shared_token"
    shared.write_text("t")
    shared.chmod(0o644)
    with pytest.raises(ConfigError, match=r"shared_token can be read by other users \(mode 644\); chmod 600"):
        require_token_auth({"RAY_AUTH_TOKEN_PATH": str(shared)}, local=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token
    with pytest.raises(ConfigError, match="needs the Ray cluster's token"):
        require_token_auth({}, local=False)

    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    old_umask = os.umask(0)  # the file's mode must not depend on it
    try:
        require_token_auth(env, local=True)
    finally:
        os.umask(old_umask)
    token = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert env["RAY_AUTH_MODE"] == "token" and token.parent.parent == tmp_path / "cache"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64
    assert not (tmp_path / "home").exists()  # not Ray's own ~/.ray/auth_token
    shared.chmod(0o600)
    kept = {"RAY_AUTH_TOKEN_PATH": str(shared)}
    require_token_auth(kept, local=True)
    assert kept == {"RAY_AUTH_TOKEN_PATH": str(shared), "RAY_AUTH_MODE": "token"}


def test_a_local_instance_starts_with_a_token_of_its_own(tmp_path, monkeypatch):
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    from flows.ray_cluster import _reload_ray_auth, make_ray_task_runner

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    try:
        with make_ray_task_runner(None, 1, {}) as runner:
            assert runner.init_kwargs["dashboard_host"] == "127.0.0.1"
            assert is_token_auth_enabled()
            token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
            assert token.is_file() and token.stat().st_mode & 0o777 == 0o600
        assert not (tmp_path / "home" / ".ray").exists()
    finally:
        monkeypatch.undo()
        _reload_ray_auth()
