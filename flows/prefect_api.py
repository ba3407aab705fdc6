"""The Prefect API a process reports to, and stage functions as Prefect tasks.

PREFECT_API_URL when it is set (a team's server, a test harness). Otherwise one local server that every stage
process and pipeline run of this Prefect home shares (flows/api_server.py): the first that needs it starts it in
the background and records it in PREFECT_HOME/dna-api.json; the others find it there, so `dvc repro` pays a server
start once, not once per stage. It stops by itself after IDLE_S seconds without requests or users. A record is
trusted only while its pid is still the server it recorded (flows/processes.py): a pid reused by another process,
or a record from before a reboot, is neither waited for nor signalled.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flows.processes import is_recorded_process, own_stamp, start_stamp

RECORD, USERS, LOG, LOCK = "dna-api.json", "dna-api-users", "dna-api.log", "dna-api.lock"
IDLE_S = float(os.environ.get("DNA_PREFECT_IDLE_S", 900))  # how long the shared server outlives its last use
PORTS = range(8000, 9000)  # where Prefect's temporary servers listen too


def prefect_home() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()).expanduser()


def configured_api() -> str | None:
    """PREFECT_API_URL as this thread's Prefect settings have it (a test harness sets it there, not in os.environ)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


MARKER = "flows.api_server"  # in the server's command line


def _free_port() -> int:
    for _ in range(50):
        port = random.choice(PORTS)
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port for a Prefect server in {PORTS.start}-{PORTS.stop - 1}")


@dataclass
class SharedServer:
    """The shared server of a Prefect home: its URL and pid, as recorded, and (when this process started it) the
    process."""

    url: str
    pid: int
    stamp: str | None  # the process's start stamp (flows/processes.py)
    home: Path
    process: subprocess.Popen | None = None

    def running(self) -> bool:
        """Whether the recorded process still runs (and is still the server, not a process that reuses its pid)."""
        if self.process is not None:
            return self.process.poll() is None
        return is_recorded_process(self.pid, self.stamp, MARKER)

    def ready(self, timeout: float | None = None) -> str:
        """Wait until the server answers; its API URL. Raises RuntimeError if it exits or does not answer in time."""
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        limit = time.monotonic() + (timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        while time.monotonic() < limit:
            if healthy(self.url, timeout=1.0):
                return self.url
            if not self.running():
                break
            time.sleep(0.1)
        log = self.home / LOG
        tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
        raise RuntimeError(f"the local Prefect server ({self.url}, pid {self.pid}) did not start; {log}:\n{tail}")

    def use(self) -> None:
        """Register this process as a user: the server stays up while it runs (see flows/api_server.py)."""
        users = self.home / USERS
        users.mkdir(parents=True, exist_ok=True)
        (users / str(os.getpid())).write_text(own_stamp() or "")


def recorded_server(home: Path | None = None) -> SharedServer | None:
    """The recorded shared server of a Prefect home if its process still runs (it may still be starting)."""
    home = home or prefect_home()
    try:
        record = json.loads((home / RECORD).read_text())
        server = SharedServer(record["url"], int(record["pid"]), record.get("stamp"), home)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return server if server.running() else None


def _start(home: Path) -> SharedServer:
    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0"}
    env.pop("PREFECT_API_URL", None)
    with open(home / LOG, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.api_server", "--port", str(port), "--idle", str(IDLE_S),
             "--users", str(home / USERS)],
            cwd=Path(__file__).resolve().parents[1], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True)  # not stopped with the process that started it, nor by its Ctrl-C
    server = SharedServer(f"http://127.0.0.1:{port}/api", process.pid, start_stamp(process.pid), home, process)
    tmp = home / f"{RECORD}.{os.getpid()}"
    tmp.write_text(json.dumps({"url": server.url, "pid": server.pid, "stamp": server.stamp}))
    tmp.replace(home / RECORD)
    return server


def shared_server() -> SharedServer:
    """The shared server of this Prefect home, started now if none runs; registers this process as a user.

    Does not wait for a server that is starting: call .ready() when the API is needed (the caller can do its own
    set-up, such as imports and config checks, meanwhile)."""
    import fcntl

    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per Prefect home, even when processes start at once
        server = recorded_server(home) or _start(home)
        server.use()
    return server


def stop_shared_server(home: Path | None = None, timeout: float = 10.0) -> bool:
    """Stop the shared server of a Prefect home (SIGTERM, then SIGKILL); whether one was running (a record of a
    process that is not the server any more is left alone)."""
    import signal

    server = recorded_server(home)
    if server is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.pid, signal.SIGTERM)
    limit = time.monotonic() + timeout
    while server.running() and time.monotonic() < limit:
        time.sleep(0.1)
    if server.running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGKILL)
    return True


class ApiLease:
    """The API this process reports to, decided early (start_api) and waited for late (reporting), so a server
    that has to start does so while the process imports and checks its config."""

    def __init__(self, url: str | None, server: SharedServer | None):
        self.url, self.server = url, server

    @contextlib.contextmanager
    def reporting(self) -> Iterator[str]:
        """Within: this thread's Prefect settings, and os.environ (for other threads and for processes started from
        here: DVC's stages, task-runner workers), name the API."""
        if self.server is None:
            yield self.url
            return
        from prefect.settings import PREFECT_API_URL, temporary_settings

        url = self.server.ready()
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield url
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous


def start_api() -> ApiLease:
    """PREFECT_API_URL when set, else the shared server (started now, in the background, if none runs)."""
    url = configured_api()
    if url:
        return ApiLease(url, None)
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED

    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return ApiLease(None, None)  # Prefect itself then says that PREFECT_API_URL is needed
    return ApiLease(None, shared_server())


def prefect_api_url() -> str | None:
    """The Prefect API this process reports to (PREFECT_API_URL, or the shared local server, started if needed);
    for processes started from here."""
    lease = start_api()
    return lease.server.ready() if lease.server is not None else lease.url


def share_prefect_api() -> str | None:
    """prefect_api_url(), exported as PREFECT_API_URL so that processes started from here (task-runner workers)
    report to the same server instead of each starting a temporary one."""
    url = prefect_api_url()
    if url:
        os.environ["PREFECT_API_URL"] = url
    return url


def worth_retrying(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn of every task of the flows: retry a failure that may pass on another try (a lost
    worker, a dropped connection), not one that fails the same way on every try (dna.errors.fails_alike: a bad
    config, a missing input, a diverging loss, a failed parity check)."""
    from dna.errors import fails_alike

    error = state.data if isinstance(state.data, BaseException) else None
    return error is None or not fails_alike(error)


def stage_task(fn: Callable, name: str, retries: int):
    """A stage function as a Prefect task with orchestration.retries retries of what is worth retrying (no result
    caching: the stages' checkpoints decide what is redone, so a retry of a training stage resumes from its last
    epoch)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(fn, name=name, retries=retries, retry_delay_seconds=1, retry_condition_fn=worth_retrying,
                cache_policy=NO_CACHE)
