"""Block tasks on Ray that hold cluster resources while they run: `orchestration.task_resources: {GPU: 1}` makes
each block a Ray task with `num_gpus=1`, and Ray sets the task's CUDA_VISIBLE_DEVICES to the GPU it was given, so
every block runs alone on its own card. Other keys are Ray's custom resources (`ray start --resources`), CPU its
`num_cpus`. Before any block is submitted, the cluster's resources are checked: a request that no node can meet
stops the flow instead of leaving its tasks pending for ever.

Without `orchestration.cluster_address` the runner starts a local Ray instance of max_workers CPUs (and the GPUs
Ray finds); with it, the flow joins that cluster (`ray start --head` on one machine, `ray start --address` on the
others). Either way the tasks get this process's PREFECT_API_URL through Ray's runtime environment.

Ray runs whatever its clients submit, and Ray 2.60 binds its GCS, raylets and workers to all interfaces (asking for
127.0.0.1 as the node address gets the machine's address instead); only its token authentication keeps other
machines and users out. So the runner refuses RAY_AUTH_MODE=disabled, and reads the token only from a file that its
owner alone can read (or from RAY_AUTH_TOKEN); a local instance without a token gets a new one, written 0600 to
the project's cache, never Ray's own ~/.ray/auth_token (which Ray writes with the umask's permissions). What Ray
lets us bind is bound to loopback: the dashboard, which is also off.
"""
from __future__ import annotations

import flows.app  # noqa: F401 - first: the environment before Prefect and MLflow read it, and the schema

# isort: split

import os
import secrets
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import ray
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from dna.errors import ConfigError


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


def token_file(env: Mapping[str, str]) -> Path:
    """Where Ray reads its token: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def new_token_file(env: Mapping[str, str]) -> Path:
    """Where a local instance's own token goes: the project's cache (flows/env.py points XDG_CACHE_HOME there)."""
    return Path(env.get("XDG_CACHE_HOME") or Path.cwd() / ".cache").expanduser() / "dna" / "ray_auth_token"


def write_private(path: Path, text: str) -> None:
    """text in a file only its owner can read or write (0600, whatever the umask; an older file too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def require_token_auth(env: MutableMapping[str, str], local: bool) -> None:
    """Ray's token authentication for this process and the Ray processes it starts (set in env): ConfigError for
    RAY_AUTH_MODE=disabled, or for a token file that other users can read; a cluster's token must exist, a local
    instance without one gets a new one (written 0600)."""
    mode = env.get("RAY_AUTH_MODE", "token").strip().lower()
    if mode != "token":
        raise ConfigError(f"RAY_AUTH_MODE={mode!r}: Ray's ports are open to every machine that reaches this one and "
                          "run whatever is submitted, so orchestration.task_runner='ray' needs RAY_AUTH_MODE=token "
                          "(or unset)")
    env["RAY_AUTH_MODE"] = "token"
    if env.get("RAY_AUTH_TOKEN"):
        return
    path = token_file(env)
    if path.is_file():
        if path.stat().st_mode & 0o077:
            raise ConfigError(f"Ray's token file {path} can be read by other users (mode "
                              f"{path.stat().st_mode & 0o777:o}); chmod 600 {path}")
        env["RAY_AUTH_TOKEN_PATH"] = str(path)
        return
    if not local:
        raise ConfigError(f"orchestration.cluster_address needs the Ray cluster's token: no {path}; set "
                          "RAY_AUTH_TOKEN_PATH to a file (mode 600) that holds it, or RAY_AUTH_TOKEN")
    path = new_token_file(env)
    write_private(path, secrets.token_hex(32))
    env["RAY_AUTH_TOKEN_PATH"] = str(path)


def _reload_ray_auth() -> None:
    """Make Ray read RAY_AUTH_* again (it reads them when imported)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


class ResourceRayTaskRunner(RayTaskRunner):
    """prefect-ray's task runner; each task it submits holds `task_resources` of the node that runs it."""

    def __init__(self, address: str | None = None, init_kwargs: dict | None = None,
                 task_resources: Mapping[str, float] | None = None):
        super().__init__(address=address, init_kwargs=init_kwargs)
        self.task_resources = dict(task_resources or {})

    def duplicate(self):
        return type(self)(address=self.address, init_kwargs=self.init_kwargs, task_resources=self.task_resources)

    def __enter__(self):
        if not ray.is_initialized():  # (a Ray this process already joined was checked when it joined)
            before = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
            require_token_auth(os.environ, local=self.address in (None, "local"))
            if before != {k: os.environ.get(k) for k in before}:
                _reload_ray_auth()
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
    local = {} if address else {"num_cpus": max_workers, "include_dashboard": False, "dashboard_host": "127.0.0.1"}
    return ResourceRayTaskRunner(address=address or "local", init_kwargs=local | {"log_to_driver": True},
                                 task_resources=task_resources)
