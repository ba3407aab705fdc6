"""Prefect deployments as the README runs them. The nightly deployment, through the real entry points: `prefect
server start` on loopback, `prefect work-pool create`, `prefect --no-prompt deploy --all` with the project's
prefect.yaml, `prefect worker start` and `prefect deployment run dna-pipeline/nightly`, on a git + DVC copy of the
project with the tiny params.

On a team's server whose database is PostgreSQL (a database of its own, with pg_trgm; skipped, saying why,
without PostgreSQL), the data stage's flow is deployed to a process work pool and run by a worker.

Only a real worker imports the entrypoint the way a deployment does (with flows/ first on sys.path);
the in-process test server of the other tests does not."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
from pipeline_support import git_dvc_project
from server_support import background, free_port, get_json, postgres_database, postgres_url, query, tail

pytestmark = pytest.mark.slow  # a Prefect server and a worker each; the nightly one runs the whole tiny pipeline

RUN_TIMEOUT_S = 600
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def prefect(env: dict[str, str], cwd: Path, *args: str, timeout: int = 180) -> str:
    done = subprocess.run(["prefect", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture
def project(tmp_path) -> Path:
    """A git + DVC repository with the project's dvc.yaml, prefect.yaml, flows, core code and the tiny params.yaml."""
    return git_dvc_project(tmp_path / "project", ("dvc.yaml", "prefect.yaml", ".gitignore", ".dvcignore"))


@pytest.fixture
def shell_env(tmp_path, project) -> dict[str, str]:
    """The README's exports in a shell that has changed into the project; HOME is an empty folder to check that
    nothing is written there."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the project is imported from its folder
    env.update({
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "HOME": str(tmp_path / "home"),
        "PWD": str(project),  # what a shell sets on `cd`; prefect.yaml reads it at deploy time
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    })
    (tmp_path / "home").mkdir()
    return env


def wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited:\n{tail(log)}"
        with contextlib.suppress(OSError, ValueError):
            if get_json(f"{api}/health") is True:
                return
        time.sleep(1)
    raise AssertionError(f"prefect server not healthy after {timeout} s:\n{tail(log)}")


def wait_finished(api: str, flow_run_id: str, worker: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    state: dict = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, urllib.error.HTTPError):
            state = get_json(f"{api}/flow_runs/{flow_run_id}")["state"] or {}
        if state.get("type") in TERMINAL:
            return state
        assert worker.poll() is None, f"prefect worker exited:\n{tail(log)}"
        time.sleep(3)
    raise AssertionError(f"flow run not finished after {RUN_TIMEOUT_S} s (state {state.get('name')}):\n{tail(log)}")


def test_the_nightly_deployment_runs_the_pipeline_on_a_process_worker(tmp_path, project, shell_env):
    env, api = shell_env, shell_env["PREFECT_API_URL"]
    port = api.split(":")[-1].split("/")[0]
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    with background(["prefect", "server", "start", "--host", "127.0.0.1", "--port", port], project, env,
                    server_log) as server:
        wait_healthy(api, server, server_log)
        prefect(env, project, "work-pool", "create", "dna-process", "--type", "process")
        deployed = prefect(env, project, "--no-prompt", "deploy", "--all")
        assert "dna-pipeline/nightly" in deployed, deployed
        with background(["prefect", "worker", "start", "--pool", "dna-process"], project, env, worker_log) as worker:
            started = prefect(env, project, "deployment", "run", "dna-pipeline/nightly")
            flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
            state = wait_finished(api, flow_run_id, worker, worker_log)
        assert state["type"] == "COMPLETED", f"flow run {state.get('name')}: {state.get('message')}\n{tail(worker_log)}"
    registration = json.loads((project / "outputs" / "register" / "default" / "registration.json").read_text())
    assert registration["version"] == 1 and registration["champion"] == 1
    assert (project / "dvc.lock").is_file() and (project / "mlflow.db").is_file()
    assert sorted(p.name for p in Path(env["HOME"]).iterdir()) == [], "written to the home folder"


def test_a_server_on_postgresql_runs_a_deployed_stage_flow_on_a_process_worker(tmp_path, project, shell_env):
    """About a minute here: `prefect server start` with PREFECT_SERVER_DATABASE_CONNECTION_URL on a new
    PostgreSQL database, a process work pool, `prefect deploy` of the generic step flow, a worker that runs it for
    the data step."""
    (project / "prefect.yaml").unlink()  # its nightly deployment's parameters would be given to this flow too
    with postgres_database("prefect", extensions=("pg_trgm",)) as database:
        env = shell_env | {"PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres_url(database, "asyncpg")}
        api = env["PREFECT_API_URL"]
        port = api.split(":")[-1].split("/")[0]
        server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
        with background(["prefect", "server", "start", "--host", "127.0.0.1", "--port", port], project, env,
                        server_log) as server:
            wait_healthy(api, server, server_log, timeout=240)
            prefect(env, project, "work-pool", "create", "dna-process", "--type", "process")
            deployed = prefect(env, project, "--no-prompt", "deploy", "flows/step_flow.py:step_flow", "--name", "team",
                               "--pool", "dna-process")
            assert "dna-step/team" in deployed, deployed
            with background(["prefect", "worker", "start", "--pool", "dna-process"], project, env,
                            worker_log) as worker:
                started = prefect(env, project, "deployment", "run", "dna-step/team", "--param", 'step="data"')
                flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
                state = wait_finished(api, flow_run_id, worker, worker_log)
            assert state["type"] == "COMPLETED", f"{state.get('name')}: {state.get('message')}\n{tail(worker_log)}"
            assert query(database, f"SELECT state_type FROM flow_run WHERE id = '{flow_run_id}'") == [("COMPLETED",)]
            assert ("team",) in query(database, "SELECT name FROM deployment")
            assert query(database, "SELECT type FROM work_pool WHERE name = 'dna-process'") == [("process",)]
    splits = json.loads((project / "outputs" / "data" / "splits.json").read_text())
    assert set(splits["splits"]) == {"train", "rate", "test"}


def test_a_deployments_run_reproduces_only_its_own_project(tmp_path, monkeypatch, capsys):
    """A run's parameters come from whoever can reach the Prefect API: a deployment's run (prefect.yaml, --serve)
    refuses a project_dir other than the project of its code, before running anything there."""
    from dna.errors import ConfigError
    from flows import pipeline

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "params.yaml").write_text("seed: 0\n")
    served = []
    monkeypatch.setattr(pipeline.pipeline_flow, "serve", lambda **kwargs: served.append(kwargs))
    assert pipeline.main(["--serve", "--project-dir", str(elsewhere)]) == 2
    assert served == [] and f"project_dir='{elsewhere}'" in capsys.readouterr().err

    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "5c0ddf52-3f0d-4a73-9a4b-7b1b0f6a2a4e")  # a deployment's run
    with pytest.raises(ConfigError, match="a deployment runs `dvc repro` only in its own project"):
        pipeline.pipeline_flow.fn(str(elsewhere))
    assert sorted(p.name for p in elsewhere.iterdir()) == ["params.yaml"]
    assert pipeline.project_root(str(pipeline.PROJECT / "flows" / ".."), deployed=True) == pipeline.PROJECT
    assert pipeline.project_root(str(elsewhere), deployed=False) == elsewhere  # a call in-process (tests, the CLI)


def test_a_team_server_with_an_auth_string_answers_only_clients_that_send_it(tmp_path, project, shell_env):
    """PREFECT_SERVER_API_AUTH_STRING on `prefect server start` (basic auth, as the README sets up a team server):
    a request without it is refused (but the health check), a client with PREFECT_API_AUTH_STRING works."""
    import base64
    import urllib.request

    secret = "dna-team:a-long-random-password"
    env, api = shell_env | {"PREFECT_SERVER_API_AUTH_STRING": secret}, shell_env["PREFECT_API_URL"]
    port = api.split(":")[-1].split("/")[0]
    log = tmp_path / "server.log"
    with background(["prefect", "server", "start", "--host", "127.0.0.1", "--port", port], project, env,
                    log) as server:
        wait_healthy(api, server, log)  # the health check needs no credentials
        request = urllib.request.Request(f"{api}/flows/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        client = {k: v for k, v in shell_env.items() if k != "PREFECT_SERVER_API_AUTH_STRING"}
        denied = subprocess.run(["prefect", "work-pool", "ls"], cwd=project, env=client, capture_output=True,
                                text=True, timeout=180, check=False)
        assert denied.returncode != 0 and "401" in denied.stdout + denied.stderr
        prefect(client | {"PREFECT_API_AUTH_STRING": secret}, project, "work-pool", "create", "dna-process", "--type",
                "process")
        request.add_header("Authorization", "Basic " + base64.b64encode(secret.encode()).decode())
        request.full_url = f"{api}/work_pools/filter"
        with urllib.request.urlopen(request, timeout=10) as response:
            assert [pool["name"] for pool in json.loads(response.read())] == ["dna-process"]
