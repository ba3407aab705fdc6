"""`python -m flows.<step>` runs in a fork of a warm host (flows/warm.py, flows/warm_host.py): the same outputs as a
process of its own, its exit status and error line on the command's own streams, signals and a dead command reach
it, and edited code or a changed environment never runs in a host that imported something else."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_support import ROOT, tiny_raw, write_params

from flows import warm

STEP = re.compile(r"step (\d+): python -m (\S+)")


def environment(project: Path, api: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(project / ".prefect"),
            "DNA_WARM_IDLE_S": "20", **extra}


def step(module: str, project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"flows.{module}", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def served(project: Path) -> list[tuple[int, str]]:
    """(pid, module) of every step the hosts of this project's Prefect home forked, in order."""
    logs = sorted((project / ".prefect" / "dna-warm-hosts").glob("*.log"))
    return [(int(pid), module) for log in logs for pid, module in STEP.findall(log.read_text())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(condition, timeout: float = 60.0) -> bool:
    limit = time.monotonic() + timeout
    while time.monotonic() < limit:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def project(tmp_path):
    write_params(tmp_path / "params.yaml", tiny_raw())
    yield tmp_path
    from flows.warm_host import stop_hosts

    stop_hosts({"PREFECT_HOME": str(tmp_path / ".prefect")})


def test_steps_run_in_forks_of_one_host_and_write_what_a_process_of_their_own_writes(project, prefect_api, tmp_path):
    env = environment(project, prefect_api)
    first, second = step("data", project, env), step("data", project, env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    forks = served(project)
    assert [module for _, module in forks] == ["flows.data", "flows.data"]
    assert len(list((project / ".prefect" / "dna-warm-hosts").glob("*.pid"))) == 1  # one host served both
    assert "Finished in state Completed" in second.stderr  # the fork's logs reach the command's stderr

    warm_splits = (project / "outputs" / "data" / "splits.json").read_bytes()
    cold = tmp_path / "cold"
    cold.mkdir()
    write_params(cold / "params.yaml", tiny_raw())
    alone = step("data", cold, environment(cold, prefect_api, DNA_WARM="0"))
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert not served(cold)
    assert (cold / "outputs" / "data" / "splits.json").read_bytes() == warm_splits


def test_a_bad_config_exits_2_with_its_line_on_the_commands_stderr(project, prefect_api):
    result = step("data", project, environment(project, prefect_api), "--set", "data.source=nope")
    assert result.returncode == 2
    assert "data.source" in result.stderr and "digits" in result.stderr
    assert [module for _, module in served(project)] == ["flows.data"]
    assert not (project / "outputs").exists()


def test_sigterm_reaches_the_step_and_a_killed_command_stops_it(project, prefect_api):
    raw = tiny_raw()
    raw["teacher"]["train"]["epochs"] = 500
    write_params(project / "params.yaml", raw)
    env = environment(project, prefect_api)
    assert step("data", project, env).returncode == 0
    for count, sig in enumerate((signal.SIGTERM, signal.SIGKILL), 1):
        command = subprocess.Popen([sys.executable, "-m", "flows.teacher"], cwd=project, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda n=count: [m for _, m in served(project)].count("flows.teacher") == n)
        pid = served(project)[-1][0]
        time.sleep(2)
        assert alive(pid)
        command.send_signal(sig)
        assert command.wait(timeout=60) != 0
        assert wait_until(lambda p=pid: not alive(p)), f"step {pid} outlived its command ({sig.name})"


def test_the_host_key_follows_code_environment_and_directory_but_not_shell_noise(tmp_path, monkeypatch):
    (tmp_path / "dna").mkdir()
    (tmp_path / "flows").mkdir()
    module = tmp_path / "dna" / "stage.py"
    module.write_text("x = 1\n")
    monkeypatch.setattr(warm, "ROOT", tmp_path)
    env = {"PREFECT_HOME": "/a", "PWD": "/x"}
    base = warm.key(env, cwd="/p")
    assert warm.key(env | {"PWD": "/y", "SHLVL": "3", "DNA_MLFLOW_PARENT_RUN_ID": "r2"}, cwd="/p") == base
    assert warm.key(env | {"PREFECT_HOME": "/b"}, cwd="/p") != base
    assert warm.key(env, cwd="/q") != base
    module.write_text("x = 22\n")
    assert warm.key(env, cwd="/p") != base


def test_only_flows_modules_run_as_python_m_are_handed_over(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["-m"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-X", "importtime", "-m", "flows.data", "-S", "seed=1"])
    assert warm.requested_module() == "flows.data"
    assert warm.script_args() == ["-S", "seed=1"]
    monkeypatch.setattr(sys, "argv", ["-c"])
    assert warm.requested_module() is None
    calls = []
    monkeypatch.setattr(warm, "delegate", lambda module, args: calls.append(module))
    monkeypatch.setattr(sys, "argv", ["-m"])
    for module in ("flows.api_server", "flows.warm_host", "benchmarks.loader_speed"):
        monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", module])
        warm.delegate_from_package_import()
    monkeypatch.setenv("DNA_WARM", "0")
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "flows.data"])
    warm.delegate_from_package_import()
    assert calls == []
