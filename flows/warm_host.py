"""A warm host for step processes: `python -m flows.<step>` runs in a fork of a process that has already imported
torch, timm, Prefect, MLflow and the flows, so a step pays its own work, not seconds of imports.

`flows/__init__.py` hands every `python -m flows.<module>` (DVC's stage commands, a person's) to `delegate()`
before anything heavy is imported. It connects to the host of this project, code and environment, starting one in
the background if none runs (the first step then waits for its imports, as it would have paid them itself), and
sends its command line, working directory, environment and its stdin, stdout and stderr. The host forks; the fork
takes those over and runs the module as `__main__`, exactly as `python -m` would. Each step stays a process of its
own (DVC can rerun one alone): its exit status is the command's, Ctrl-C and SIGTERM reach it, and it is stopped
if the command dies.

A host accepts only its owner's commands (a 0600 socket in a 0700 folder, and the peer's uid checked), runs only
the project's steps (flows/warm.py: served_modules), drops a client that does not send its request within
REQUEST_TIMEOUT_S, and, when stopped (SIGTERM), passes SIGTERM to its running steps and waits for them.

A host serves one key: this project's folder, the working directory, the interpreter, the installed packages,
the code of dna/ and flows/ (sizes and modification times) and the environment. Another key gets another host,
so an edited module or a changed variable never runs in stale code. A host exits after DNA_WARM_IDLE_S seconds
(default 600) without a running step, or with `python -m flows.warm_host --stop`, which `make clean` runs.
DNA_WARM=0 turns it off (every step then imports for itself).

The command side is flows/warm.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

from flows.processes import is_recorded_process, own_stamp
from flows.warm import HEADER, idle_s, peer_uid, records, served_modules

# What the host imports before it serves: what a step's process would import, but for ONNX Runtime, whose import
# starts a thread that a fork cannot end (the fork then hangs or aborts at exit); the steps that use it import it.
WARM_MODULES = ("torch", "timm", "onnx", "prefect", "mlflow", "sklearn", "matplotlib.pyplot",
                # what the first MLflow run, the data split and the Prefect client import when first used
                "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
                "mlflow.store.db.utils", "mlflow.tracing.export", "alembic.command", "sqlalchemy.dialects.sqlite",
                "git", "sklearn.datasets", "sklearn.model_selection", "anyio._backends._asyncio",
                "prefect.flow_engine", "prefect.task_engine", "prefect.artifacts", "prefect.telemetry.run_telemetry",
                "prefect.utilities.visualization", "dna.data", "dna.loading",
                "dna.pipeline", "dna.cli", "flows.data", "flows.teacher", "flows.distill", "flows.latency_profile",
                "flows.search", "flows.retrain", "flows.figures", "flows.export", "flows.register", "flows.rank",
                "flows.pipeline")


REQUEST_TIMEOUT_S = 10.0  # a command sends its request as soon as it connects
MAX_REQUEST = 64 * 2**20
STOP_WAIT_S = 20.0  # for the running steps to end after SIGTERM, before SIGKILL
MARKER = "flows.warm_host"  # in a host's command line (flows/warm.py starts it)


def _read(conn: socket.socket, data: bytearray, size: int, deadline: float) -> bytearray:
    """data, completed to `size` bytes from the connection before the deadline (time.monotonic())."""
    while len(data) < size:
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = conn.recv(min(size - len(data), 2**20))
        if not chunk:
            raise ConnectionError("the command closed its connection mid-request")
        data += chunk
    return data


def checked(request, fds: list[int]) -> dict:
    """The request if it is one this host runs (raises ValueError, saying why, if not)."""
    if not isinstance(request, dict):
        raise ValueError("the request is not a JSON object")
    module = request.get("module")
    if not isinstance(module, str) or module not in served_modules():
        raise ValueError(f"module {module!r} is not a step of this project")
    argv, cwd, env = request.get("argv"), request.get("cwd"), request.get("env")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and isinstance(cwd, str)
            and isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise ValueError("the request needs argv (strings), cwd (a string) and env (strings)")
    if len(fds) != 3:
        raise ValueError(f"the request passed {len(fds)} file descriptors, not stdin, stdout and stderr")
    return request


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """A checked request and the command's standard streams; raises OSError or ValueError (the descriptors closed)
    for a peer of another uid, a request that is late, too large or not one this host runs."""
    uid = peer_uid(conn)
    if uid is not None and uid != os.getuid():
        raise PermissionError(f"uid {uid} is not the host's owner (uid {os.getuid()})")
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    fds: list[int] = []
    try:
        conn.settimeout(REQUEST_TIMEOUT_S)
        first, fds, _flags, _addr = socket.recv_fds(conn, 1, 8)
        if not first:
            raise ConnectionError("the command closed its connection before its request")
        size = int.from_bytes(_read(conn, bytearray(first), HEADER, deadline), "big")
        if size > MAX_REQUEST:
            raise ValueError(f"a request of {size} bytes")
        request = checked(json.loads(_read(conn, bytearray(), size, deadline)), fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    conn.settimeout(None)
    return request, fds


class Job:
    """One step in the fork: the command's standard streams, directory and environment, then the module."""

    def __init__(self, request: dict, fds: list[int]):
        self.request, self.fds = request, fds

    def run(self) -> int:
        import random
        import runpy

        for target, fd in zip((0, 1, 2), self.fds):
            os.dup2(fd, target)
            os.close(fd)
        if os.isatty(1):
            sys.stdout.reconfigure(line_buffering=True)
        os.chdir(self.request["cwd"])
        os.environ.clear()
        os.environ.update(self.request["env"])
        random.seed()  # as a new process would be: the host's state is shared by every fork
        sys.argv = ["-m", *self.request["argv"]]
        sys.modules.pop(self.request["module"], None)  # imported by the host: run it afresh, as `python -m` does
        try:
            runpy.run_module(self.request["module"], run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
            if code is None or isinstance(code, int):
                return code or 0
            print(code, file=sys.stderr)
            return 1
        return 0


def _exit_code(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code  # killed by a signal: as a shell reports it


def serve(path: Path, idle: float) -> Job | None:
    """Accept commands until idle; returns in the fork (the Job to run) and, in the host, None when it stops."""
    records().mkdir(parents=True, exist_ok=True)
    record = records() / f"{os.getpid()}.pid"
    record.write_text(json.dumps({"socket": str(path), "stamp": own_stamp()}))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener.bind(str(path))
    os.chmod(path, 0o600)  # before listen: nobody can connect yet
    listener.listen(16)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    last = time.monotonic()
    print(f"{time.strftime('%H:%M:%S')} warm host {os.getpid()} serves {path}", flush=True)
    try:
        while not stopping:
            for event, _mask in selector.select(timeout=0.1):
                if event.fileobj is listener:
                    conn, _addr = listener.accept()
                    try:
                        request, fds = _receive(conn)
                    except (OSError, ValueError) as exc:
                        print(f"{time.strftime('%H:%M:%S')} refused: {exc or type(exc).__name__}", flush=True)
                        conn.close()
                        continue
                    pid = os.fork()
                    if pid == 0:
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        selector.close()
                        listener.close()
                        for other in children.values():
                            other.close()
                        conn.close()
                        return Job(request, fds)
                    for fd in fds:
                        os.close(fd)
                    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                    children[pid] = conn
                    selector.register(conn, selectors.EVENT_READ, pid)
                    print(f"{time.strftime('%H:%M:%S')} step {pid}: python -m {request['module']} "
                          f"{' '.join(request['argv'])}", flush=True)
                else:  # the command closed its side (it died): stop its step
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(event.data, signal.SIGTERM)
                    selector.unregister(event.fileobj)
            if _reap(children, selector):
                last = time.monotonic()
            if not children and time.monotonic() - last > idle:
                break
    finally:
        if record.name == f"{os.getpid()}.pid":  # the host, not a fork on its way to its job
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            _stop_steps(children, selector)
            record.unlink(missing_ok=True)
    return None


def _reap(children: dict[int, socket.socket], selector: selectors.BaseSelector) -> bool:
    """Tell the commands of the steps that ended their exit status; whether any ended."""
    ended = False
    for pid in list(children):
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            conn = children.pop(pid)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"status": _exit_code(wait_status)}).encode() + b"\n")
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(conn)
            conn.close()
            ended = True
    return ended


def _stop_steps(children: dict[int, socket.socket], selector: selectors.BaseSelector) -> None:
    """SIGTERM to the running steps, and wait for them (SIGKILL after STOP_WAIT_S): none outlives the host."""
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    limit = time.monotonic() + STOP_WAIT_S
    while children and time.monotonic() < limit:
        _reap(children, selector)
        time.sleep(0.05)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while children:
        _reap(children, selector)
        time.sleep(0.01)


def warm_up() -> None:
    import importlib

    start = time.monotonic()
    for name in WARM_MODULES:
        importlib.import_module(name)
    from sqlalchemy.orm import configure_mappers

    configure_mappers()  # MLflow's tables, which SQLAlchemy otherwise sets up at a step's first query
    gc.freeze()  # the collector of a fork then leaves the host's objects alone: no copy-on-write of every page
    if "onnxruntime" in sys.modules:
        raise RuntimeError("onnxruntime was imported while warming up: forks of this process would hang at exit")
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    print(f"{time.strftime('%H:%M:%S')} imported {len(WARM_MODULES)} modules in {time.monotonic() - start:.1f} s "
          f"({threads} thread{'s' if threads > 1 else ''})", flush=True)


def recorded_host(record: Path) -> tuple[int, str] | None:
    """(pid, start stamp) of the host a record names, if that process still runs and is that host."""
    try:
        pid, stamp = int(record.stem), json.loads(record.read_text())["stamp"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, stamp) if is_recorded_process(pid, stamp, MARKER) else None


def stop_hosts(env: dict[str, str] | None = None, timeout: float = STOP_WAIT_S + 10.0) -> int:
    """Stop the warm hosts recorded in this Prefect home and wait for them (and so for their steps); how many were
    running. A record whose pid is now another process (it ended, the machine rebooted) is removed, nothing sent."""
    stopped = []
    for record in records(env).glob("*.pid") if records(env).is_dir() else ():
        host = recorded_host(record)
        if host is None:
            record.unlink(missing_ok=True)
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(host[0], signal.SIGTERM)
            stopped.append(host)
    limit = time.monotonic() + timeout
    for pid, stamp in stopped:
        while time.monotonic() < limit and is_recorded_process(pid, stamp, MARKER):
            time.sleep(0.05)
    return len(stopped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=Path, metavar="SOCKET", help="serve on this socket (what a command starts)")
    parser.add_argument("--idle", type=float, default=idle_s(), help="seconds without a step before it exits")
    parser.add_argument("--stop", action="store_true", help="stop the warm hosts of this Prefect home")
    args = parser.parse_args(argv)
    if args.stop:
        count = stop_hosts()
        print(f"stopped {count} warm host{'s' if count != 1 else ''}")
        return 0
    if args.serve is None:
        parser.error("--serve or --stop")
    warm_up()
    job = serve(args.serve, args.idle)
    return job.run() if job is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
