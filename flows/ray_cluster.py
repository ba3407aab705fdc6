"""Block tasks on Ray that hold cluster resources while they run: `orchestration.task_resources: {GPU: 1}` makes
each block a Ray task with `num_gpus=1`, and Ray sets the task's CUDA_VISIBLE_DEVICES to the GPU it was given, so
every block runs alone on its own card. Other keys are Ray's custom resources (`ray start --resources`), CPU its
`num_cpus`. Before any block is submitted, the cluster's resources are checked: a request that no node can meet
stops the flow instead of leaving its tasks pending for ever.

Without `orchestration.cluster_address` the runner starts a local Ray instance of max_workers CPUs (and the GPUs
Ray finds); with it, the flow joins that cluster (`ray start --head` on one machine, `ray start --address` on the
others). Either way the tasks get this process's PREFECT_API_URL through Ray's runtime environment.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import ray
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from dna.config import ConfigError


def ray_options(resources: Mapping[str, float]) -> dict:
    """Ray's task options for task_resources: GPU and CPU are its num_gpus and num_cpus, other keys custom."""
    rest = dict(resources)
    options = {name: rest.pop(key) for key, name in (("GPU", "num_gpus"), ("CPU", "num_cpus")) if key in rest}
    return options | ({"resources": rest} if rest else {})


def missing_resources(nodes: list[dict], needed: Mapping[str, float]) -> str | None:
    """Why no node (ray.nodes()) can run a task that holds `needed`; None if one can."""
    alive = {node["NodeManagerAddress"] + ":" + str(node.get("NodeManagerPort", "")): node.get("Resources", {})
             for node in nodes if node.get("Alive", node.get("alive"))}
    if not needed or any(all(have.get(k, 0) >= v for k, v in needed.items()) for have in alive.values()):
        return None
    listing = "; ".join(f"{addr}: {({k: v for k, v in have.items() if '.' not in k and ':' not in k})}"
                        for addr, have in sorted(alive.items()))
    return (f"orchestration.task_resources={dict(needed)} but no node of the Ray cluster offers them (nodes and their "
            f"resources: {listing or 'none'}); start nodes with `ray start ... --num-gpus 1`, or change the key")


def worker_env() -> dict[str, str]:
    """This process's Prefect API for the tasks (credentials stay in the nodes' own environment, not in Ray's job
    config, which every user of the cluster can read)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL")
    return {"PREFECT_API_URL": url} if url else {}


class ResourceRayTaskRunner(RayTaskRunner):
    """prefect-ray's task runner; each task it submits holds `task_resources` of the node that runs it."""

    def __init__(self, address: str | None = None, init_kwargs: dict | None = None,
                 task_resources: Mapping[str, float] | None = None):
        super().__init__(address=address, init_kwargs=init_kwargs)
        self.task_resources = dict(task_resources or {})

    def duplicate(self):
        return type(self)(address=self.address, init_kwargs=self.init_kwargs, task_resources=self.task_resources)

    def __enter__(self):
        env = worker_env()
        if env:  # the tasks report to this process's Prefect API, wherever Ray runs them
            runtime_env = dict(self.init_kwargs.get("runtime_env") or {})
            runtime_env["env_vars"] = env | dict(runtime_env.get("env_vars") or {})
            self.init_kwargs["runtime_env"] = runtime_env
        super().__enter__()
        if self.task_resources:
            reason = missing_resources(ray.nodes(), self.task_resources)
            if reason:
                self.__exit__(None, None, None)
                raise ConfigError(reason)
        return self

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        if not self.task_resources:
            return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)
        with remote_options(**ray_options(self.task_resources)):
            return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)


def make_ray_task_runner(address: str | None, max_workers: int, task_resources: Mapping[str, float]):
    """Without an address, a new local instance ("local": not a cluster that `ray start` left on this machine,
    which ray.init would otherwise join)."""
    local = {} if address else {"num_cpus": max_workers, "include_dashboard": False}
    return ResourceRayTaskRunner(address=address or "local", init_kwargs=local | {"log_to_driver": True},
                                 task_resources=task_resources)
