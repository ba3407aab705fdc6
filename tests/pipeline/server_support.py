"""Real servers for the orchestration tests, on loopback: free ports, background processes that are always stopped,
waiting until a server answers, a database of its own per test in the local PostgreSQL, a Dask cluster of a
scheduler and one worker per (pretend) GPU started with the `dask` command line, and a Ray head node started with
`ray start`.

Without PostgreSQL the tests that need it skip and say why; DNA_REQUIRE_POSTGRES=1 (where CI has it) makes that
a failure instead. DNA_TEST_POSTGRES is the database to connect to first (default: the local server's `test`)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_support import ROOT

POSTGRES = os.environ.get("DNA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the process group (Prefect's worker ignores SIGTERM for a while), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


@contextlib.contextmanager
def background(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`cmd` running in its own process group, its output in `log`; stopped (group and all) on leaving."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            stop(proc)


def wait_answering(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240, expect=None) -> None:
    """Poll `url` until it answers (with JSON equal to `expect`, if given) while `proc` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{' '.join(map(str, proc.args[:3]))} exited:\n{tail(log)}"
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read()
            if expect is None or json.loads(body) == expect:
                return
        time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{tail(log)}")


def _skip_or_fail(reason: str):
    if os.environ.get("DNA_REQUIRE_POSTGRES", "") not in ("", "0"):
        pytest.fail(f"DNA_REQUIRE_POSTGRES is set but {reason}")
    pytest.skip(reason)


def postgres_url(database: str, driver: str | None = None) -> str:
    """POSTGRES with another database and, for SQLAlchemy, an explicit driver (`psycopg2`, `asyncpg`)."""
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES).set(database=database)
    if driver:
        url = url.set(drivername=f"postgresql+{driver}")
    return url.render_as_string(hide_password=False)


@contextlib.contextmanager
def postgres_database(purpose: str, extensions: tuple[str, ...] = ()) -> Iterator[str]:
    """A new, empty database in the local PostgreSQL, with `extensions`; dropped on leaving. Yields its name."""
    try:
        import psycopg2
    except ImportError:
        _skip_or_fail("psycopg2 is not installed (pip install -e '.[pipeline]')")
    try:
        admin = psycopg2.connect(POSTGRES, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        _skip_or_fail(f"PostgreSQL is not reachable at {POSTGRES}: {str(exc).strip()}")
    admin.autocommit = True
    name = f"dna_{purpose}_{uuid.uuid4().hex[:8]}"
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        if extensions:
            with contextlib.closing(psycopg2.connect(postgres_url(name), connect_timeout=5)) as conn:
                conn.autocommit = True
                with conn.cursor() as cur:
                    for extension in extensions:
                        cur.execute(f'CREATE EXTENSION IF NOT EXISTS "{extension}"')
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def query(database: str, sql: str) -> list[tuple]:
    import psycopg2

    with contextlib.closing(psycopg2.connect(postgres_url(database), connect_timeout=5)) as conn:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()


@contextlib.contextmanager
def dask_cluster(logs: Path, gpus: int = 2, threads: int = 1) -> Iterator[tuple[str, dict[str, dict]]]:
    """`dask scheduler` and one `dask worker` per GPU on loopback, as the README starts them: worker i with
    CUDA_VISIBLE_DEVICES=i and the resource GPU=1, the project (and these tests) importable. Yields the scheduler's
    address and, per worker address, its process id and CUDA_VISIBLE_DEVICES."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ)
    here = str(Path(__file__).parent)  # the scheduler unpickles tasks too: tests' own task functions must import
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), here, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        scheduler = stack.enter_context(background(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            ROOT, env, logs / "scheduler.log"))
        for gpu in range(gpus):
            stack.enter_context(background(
                [str(BIN / "dask"), "worker", address, "--host", "127.0.0.1", "--nthreads", str(threads),
                 "--resources", "GPU=1", "--name", f"gpu{gpu}", "--no-dashboard"],
                ROOT, env | {"CUDA_VISIBLE_DEVICES": str(gpu)}, logs / f"worker_{gpu}.log"))
        with Client(address, timeout=120, set_as_default=False) as client:  # the flows make their own client
            try:
                client.wait_for_workers(gpus, timeout=180)
            except TimeoutError:
                raise AssertionError(f"{gpus} Dask workers did not join:\n{tail(logs / 'worker_0.log')}") from None
            workers = client.run(lambda: {"pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")})
        assert scheduler.poll() is None
        yield address, workers


@contextlib.contextmanager
def ray_auth(folder: Path) -> Iterator[dict[str, str]]:
    """Ray's token authentication with a token of its own in `folder`, for this process (and the processes it
    starts) until the end of the block; yields the environment it sets. Ray reads these settings at import, so they
    are read again on entering and on leaving."""
    import secrets

    from ray._private.authentication_test_utils import reset_auth_token_state

    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)  # flows/ray_cluster.py refuses a token other users can read
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {name: os.environ.get(name) for name in auth}
    os.environ.update(auth)
    reset_auth_token_state()
    try:
        yield auth
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        reset_auth_token_state()


@contextlib.contextmanager
def ray_cluster(logs: Path, gpus: int = 2, cpus: int = 2) -> Iterator[str]:
    """A Ray head node started with `ray start --head --block`, as the README starts one, offering `gpus` (pretend)
    GPUs: Ray gives each task that holds one its own CUDA_VISIBLE_DEVICES. Ray's token authentication is on, with a
    token of this cluster's own, which this process also uses while the cluster runs. Yields its address."""
    port = free_port()
    here = str(Path(__file__).parent)  # the tests' own task functions must import on the workers
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", str(cpus),
           "--num-gpus", str(gpus), "--object-store-memory", str(200 * 2**20), "--include-dashboard", "false",
           "--disable-usage-stats"]
    log = logs / "ray_head.log"
    with ray_auth(logs) as auth:
        env = dict(os.environ) | auth
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), here, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        with background(cmd, ROOT, env, log) as head:
            deadline = time.monotonic() + 180
            while "Ray runtime started" not in tail(log, 100_000):
                if head.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the Ray head node did not start:\n{tail(log)}")
                time.sleep(0.5)
            yield f"127.0.0.1:{port}"
