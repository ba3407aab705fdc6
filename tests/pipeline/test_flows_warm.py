"""`python -m flows.<step>` runs in a fork of a warm host (flows/warm.py, flows/warm_host.py): the same outputs as a
process of its own, its exit status and error line on the command's own streams, signals and a dead command reach
it, and edited code or a changed environment never runs in a host that imported something else."""
from __future__ import annotations

import json
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


SLEEPER = """import os, pathlib, signal, sys, time
here = pathlib.Path(os.environ["SLEEPER_DIR"])
signal.signal(signal.SIGTERM, lambda *_: (here.joinpath("terminated").write_text(str(os.getpid())), sys.exit(143)))
here.joinpath("started").write_text(str(os.getpid()))
time.sleep(600)
"""
# A host without the warm-up imports, serving one module of the test's own (the sleeper above) besides the steps.
HOST = """import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import flows.warm_host as host
steps = getattr(host, "served_modules", frozenset)
host.served_modules = lambda: steps() | {"sleeper"}
host.REQUEST_TIMEOUT_S = 1.0
job = host.serve(Path(sys.argv[2]), 120)
raise SystemExit(job.run() if job is not None else 0)
"""


@pytest.fixture
def bare_host(tmp_path):
    """A host serving on a socket in an open folder (so that only its own checks keep other users out); yields
    (socket path, host process, log path)."""
    import shutil
    import tempfile

    (tmp_path / "sleeper.py").write_text(SLEEPER)
    folder = Path(tempfile.mkdtemp(prefix="dna-warm-test-"))  # pytest's own folders are closed to other users
    folder.chmod(0o755)
    path, log = folder / "host.sock", tmp_path / "host.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / ".prefect"),
           "SLEEPER_DIR": str(tmp_path)}
    with open(log, "w") as out:
        host = subprocess.Popen([sys.executable, "-c", HOST, str(tmp_path), str(path)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    assert wait_until(lambda: path.exists() or host.poll() is not None, 60) and path.exists(), log.read_text()
    yield path, host, log
    if host.poll() is None:
        host.kill()
        host.wait()
    shutil.rmtree(folder, ignore_errors=True)


def send_request(path: Path, request: dict) -> str:
    """What the host answers a request (with /dev/null as the command's streams): its first line, '' if it hung up."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, open(os.devnull, "r+b") as null:
        sock.connect(str(path))
        return ask(sock, request, [null.fileno()] * 3)


def ask(sock, request: dict, fds: list[int]) -> str:
    """The host's first answer to a request; '' if it hung up (maybe before reading all of it)."""
    sock.settimeout(30)
    try:
        warm._send(sock, request, fds)
        return sock.makefile("r").readline()
    except (BrokenPipeError, ConnectionResetError):
        return ""


def test_the_host_runs_only_the_projects_steps_and_survives_a_malformed_request(bare_host, tmp_path):
    path, host, log = bare_host
    assert path.stat().st_mode & 0o777 == 0o600
    request = {"argv": [], "cwd": str(tmp_path), "env": {}}
    assert send_request(path, request) == ""  # no module
    assert send_request(path, request | {"module": "http.server"}) == ""  # not a step: never forked
    assert send_request(path, request | {"module": ["flows.data"]}) == ""
    assert host.poll() is None
    text = log.read_text()
    assert "module None is not a step" in text and "module 'http.server' is not a step" in text
    assert not STEP.search(text)  # nothing forked
    assert warm.served_modules() >= {"flows.data", "flows.teacher", "flows.distill", "flows.latency_profile",
                                     "flows.register", "flows.rank", "flows.rounds", "flows.pipeline"}
    assert not warm.served_modules() & {"flows.warm_host", "flows.api_server", "flows.code_deps", "flows.registry"}


@pytest.mark.skipif(os.getuid() != 0, reason="connecting as another uid (65534) needs root")
def test_the_host_refuses_another_uid_and_drops_a_silent_client(bare_host):
    import socket

    path, host, log = bare_host
    path.chmod(0o666)  # as if the umask had opened it: the peer's uid still keeps the other user out
    child = os.fork()
    if child == 0:  # another user
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
                code = 0 if ask(sock, {"module": "sleeper", "argv": [], "cwd": "/", "env": {}}, [0, 1, 2]) == "" else 3
        except BaseException as exc:
            print(f"the other user's command: {exc!r}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    assert os.waitpid(child, 0)[1] == 0, "the host answered another uid"
    assert "refused: uid 65534 is not the host's owner" in log.read_text()
    assert not STEP.search(log.read_text())

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(path))
        silent.settimeout(30)
        start = time.monotonic()
        assert silent.recv(1) == b""  # the host hung up on it
        assert time.monotonic() - start < 10
    assert host.poll() is None


def test_sigterm_to_the_host_stops_its_steps_and_waits_for_them(bare_host, tmp_path):
    import socket

    path, host, log = bare_host
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, open(os.devnull, "r+b") as null:
        sock.connect(str(path))
        warm._send(sock, {"module": "sleeper", "argv": [], "cwd": str(tmp_path),
                          "env": {"SLEEPER_DIR": str(tmp_path)}}, [null.fileno()] * 3)
        sock.settimeout(60)
        reader = sock.makefile("r")
        assert "pid" in reader.readline()
        assert wait_until((tmp_path / "started").exists)
        step_pid = int((tmp_path / "started").read_text())
        host.send_signal(signal.SIGTERM)
        assert host.wait(timeout=60) == 0
        assert (tmp_path / "terminated").read_text() == str(step_pid)  # the step had its SIGTERM ...
        assert not alive(step_pid)  # ... and the host waited for it: no orphan
        assert reader.readline().strip() == '{"status": 143}'  # its command learns its exit status


def test_stop_hosts_signals_only_a_recorded_host_still_running(tmp_path):
    records = tmp_path / "prefect" / "dna-warm-hosts"
    records.mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        from flows.processes import start_stamp
        from flows.warm_host import stop_hosts

        # its pid recorded by a host that is gone: a stamp of another start, an old record of the path alone, and
        # the right stamp but not a host's command line
        for content in (json.dumps({"socket": "/x", "stamp": "boot/1"}), "/tmp/dna-warm-x.sock",
                        json.dumps({"socket": "/x", "stamp": start_stamp(bystander.pid)})):
            (records / f"{bystander.pid}.pid").write_text(content)
            assert stop_hosts({"PREFECT_HOME": str(tmp_path / "prefect")}, timeout=1) == 0
            assert bystander.poll() is None, "a process that is not a warm host was signalled"
            assert not (records / f"{bystander.pid}.pid").exists()  # the stale record is gone
    finally:
        bystander.kill()
        bystander.wait()


def test_the_socket_folder_is_this_users_alone(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = warm.private_folder()
    assert folder == tmp_path / f"dna-warm-{os.getuid()}" and folder.stat().st_mode & 0o777 == 0o700
    assert warm.socket_path("k", folder).parent == folder
    folder.chmod(0o755)  # opened up
    assert warm.private_folder() is None
    folder.chmod(0o700)
    if os.getuid() == 0:
        os.chown(folder, 65534, 65534)  # made by another user before us
        assert warm.private_folder() is None
    else:
        folder.chmod(0o750)
    monkeypatch.setattr(warm, "key", lambda: pytest.fail("a host was looked for in a folder that is not ours"))
    assert warm.delegate("flows.data", []) is None  # the command then runs the step itself
