"""What every stage flow shares: loading the config, the params each stage reads, task runners, hashes, the CLI."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dna.config import (
    ConfigError,
    OrchestrationConfig,
    Params,
    detected_faults,
    load_params,
    parse_overrides,
)

# The params.yaml keys each stage reads: what dvc.yaml lists under each stage's `params` (a test keeps the two equal)
# and what each stage's MLflow run logs as its params. Device, tracking and orchestration settings are left out on
# purpose: they change where and how a stage runs, not its result, so changing them reruns nothing.
STAGE_PARAMS: dict[str, list[str]] = {
    "data": ["seed", "data"],
    "teacher": ["seed", "data", "teacher"],
    "distill": ["seed", "data", "teacher.model", "teacher.boundaries", "space", "supervision", "distill",
                "rating"],
    "profile": ["data.image_size", "data.channels", "space", "profile"],
    "search": ["data.image_size", "data.channels", "space", "search"],
    "retrain": ["seed", "data", "teacher.model", "retrain"],
    "export": ["data", "export"],
    "register": ["mlflow.registered_model", "mlflow.promote_metric"],
}
STAGES = list(STAGE_PARAMS)
# The module that runs each stage (`python -m flows.<module>`, dvc.yaml's cmd): the stage's name, except where that
# name is a standard-library module (a Prefect worker puts flows/ first on sys.path: flows/profile.py would shadow
# the `profile` that cProfile, and so torch, imports).
STAGE_MODULES: dict[str, str] = {**{stage: stage for stage in STAGES}, "profile": "latency_profile"}

# Sections that determine the trained network; their hash tags a registered model version.
RESULT_SECTIONS = ("seed", "data", "teacher", "space", "supervision", "distill", "rating", "search", "profile",
                   "retrain", "export")


def load(params_file: str | Path = "params.yaml", overrides: dict | None = None,
         check_profile: bool = True) -> Params:
    """Load and deep-validate the config (raises ConfigError, one line naming the key, before any work);
    check_profile=False for the stage that makes the latency profile."""
    from dna.pipeline import validate

    params = load_params(params_file, overrides)
    validate(params, check_profile=check_profile)
    return params


def missing_dvc_params(raw: dict) -> list[str]:
    """Keys dvc.yaml tracks (or interpolates) that a params mapping lacks; DVC needs them written out, defaults
    are not enough."""
    missing = []
    for key in sorted({k for keys in STAGE_PARAMS.values() for k in keys} | {"outputs", "search.front_axis"}):
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    return missing


def check_dvc_params(params_file: str | Path = "params.yaml") -> None:
    """Raise ConfigError naming every key dvc.yaml needs that the params file does not spell out."""
    raw = yaml.safe_load(Path(params_file).read_text()) or {}
    missing = missing_dvc_params(raw)
    if missing:
        raise ConfigError(f"{params_file}: dvc.yaml tracks {', '.join(missing)} but the file does not set "
                          f"{'it' if len(missing) == 1 else 'them'}; write the values out (defaults are not enough "
                          f"for DVC)")


def with_absolute_outputs(params: Params) -> Params:
    """The same params with `outputs` as an absolute path, so worker processes elsewhere write to the same place."""
    return params.model_copy(update={"outputs": str(Path(params.outputs).resolve())})


def pick(params: Params, keys: list[str]) -> dict[str, Any]:
    """The values of dotted keys, e.g. pick(p, ["seed", "teacher.model"])."""
    raw = params.model_dump(mode="json")
    out = {}
    for key in keys:
        node = raw
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys with string values (lists stay one value), for MLflow params."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)}


def stage_params(params: Params, stage: str) -> dict[str, str]:
    return flatten(pick(params, STAGE_PARAMS[stage]))


def params_hash(params: Params) -> str:
    """A hash of the sections that determine the trained network (not where or how it ran)."""
    raw = params.model_dump(mode="json")
    text = json.dumps({k: raw[k] for k in RESULT_SECTIONS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_hash(params: Params, splits_file: str | Path) -> str:
    """The data config and the exact split indices (the split file) together."""
    from dna.checkpoint import file_digest

    text = json.dumps(params.data.model_dump(mode="json"), sort_keys=True) + file_digest(splits_file)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The checked-out commit, with '-dirty' when tracked files differ from it; None outside a git repository."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=False)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=False)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# Prefect -----------------------------------------------------------------------------------------------------------
def prefect_api_url() -> str | None:
    """The Prefect API this process reports to; without PREFECT_API_URL that is a temporary local server, which
    this starts now (the same one the flows of this process then use)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    url = PREFECT_API_URL.value()
    if not url and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        url = server.api_url
    return url


def share_prefect_api() -> str | None:
    """prefect_api_url(), exported as PREFECT_API_URL so that processes started from here (task-runner workers)
    report to the same server instead of each starting a temporary one."""
    url = prefect_api_url()
    if url:
        os.environ["PREFECT_API_URL"] = url
    return url


def stage_task(fn: Callable, name: str, retries: int):
    """A stage function as a Prefect task with orchestration.retries retries (no result caching: the stages'
    checkpoints decide what is redone, so a retry of a training stage resumes from its last epoch)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(fn, name=name, retries=retries, retry_delay_seconds=1, cache_policy=NO_CACHE)


# task runners -----------------------------------------------------------------------------------------------------
def make_task_runner(orch: OrchestrationConfig, dask_processes: bool | None = None):
    """The Prefect task runner named by orchestration.task_runner.

    dask: a LocalCluster of max_workers single-threaded workers, or the cluster at orchestration.dask_address.
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
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ConfigError("orchestration.task_runner='dask' needs prefect-dask: pip install prefect-dask") from None
        if orch.dask_address:
            return DaskTaskRunner(address=orch.dask_address)
        if dask_processes is None:
            dask_processes = os.environ.get("DNA_DASK_PROCESSES", "1") not in ("0", "false", "no")
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": orch.max_workers, "threads_per_worker": 1,
                                              "processes": dask_processes, "dashboard_address": None})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ConfigError("orchestration.task_runner='ray' needs prefect-ray, which is not installed: "
                              "pip install prefect-ray (or choose threads, processes or dask)") from None
        return RayTaskRunner()
    raise ConfigError(f"orchestration.task_runner={kind!r}; allowed: threads, processes, dask, ray")


# command line -----------------------------------------------------------------------------------------------------
def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "matplotlib", "alembic", "urllib3",
                  "httpx", "distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cli(run: Callable[[str, dict], Any], description: str, argv: list[str] | None = None) -> int:
    """`python -m flows.<module> [--params FILE] [--set KEY=VALUE ...]`: exit 0; 2 with one line on a bad config;
    1 with one line on a detected fault (corrupt checkpoint, diverging loss, failed ONNX parity, missing input)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", "-p", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", "-S", dest="sets", action="append", metavar="KEY=VALUE",
                        help="override a key, e.g. -S retrain.train.epochs=5")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        run(args.params, parse_overrides(args.sets))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not isinstance(exc, detected_faults()):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
