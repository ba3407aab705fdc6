"""A warm host for step processes: `python -m flows.<step>` runs in a fork of a process that has already imported
torch, timm, Prefect, MLflow and the flows, so a step pays its own work, not seconds of imports.

`flows/__init__.py` hands every `python -m flows.<module>` (DVC's stage commands, a person's) to `delegate()`
before anything heavy is imported. It connects to the host of this project, code and environment, starting one in
the background if none runs (the first step then waits for its imports, as it would have paid them itself), and
sends its command line, working directory, environment and its stdin, stdout and stderr. The host forks; the fork
takes those over and runs the module as `__main__`, exactly as `python -m` would. Each step stays a process of its
own (DVC can rerun one alone): its exit status is the command's, Ctrl-C and SIGTERM reach it, and it is stopped
if the command dies.

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

from flows.warm import HEADER, idle_s, records

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
                "flows.search", "flows.retrain", "flows.export", "flows.register", "flows.rank", "flows.pipeline")


def _read(conn: socket.socket, data: bytearray, size: int) -> bytearray:
    """data, completed to `size` bytes from the connection."""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the command closed its connection mid-request")
        data += chunk
    return data


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    first, fds, _flags, _addr = socket.recv_fds(conn, 1, 8)
    header = _read(conn, bytearray(first), HEADER)
    body = _read(conn, bytearray(), int.from_bytes(header, "big"))
    return json.loads(body), fds


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
    record.write_text(str(path))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener.bind(str(path))
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
                    except (OSError, ValueError, ConnectionError) as exc:
                        print(f"bad request: {exc}", flush=True)
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
            for pid in list(children):
                done, wait_status = os.waitpid(pid, os.WNOHANG)
                if done:
                    conn = children.pop(pid)
                    code = _exit_code(wait_status)
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps({"status": code}).encode() + b"\n")
                    with contextlib.suppress(KeyError, ValueError):
                        selector.unregister(conn)
                    conn.close()
                    last = time.monotonic()
            if not children and time.monotonic() - last > idle:
                break
    finally:
        if record.name == f"{os.getpid()}.pid":
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            record.unlink(missing_ok=True)
    return None


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


def stop_hosts(env: dict[str, str] | None = None, timeout: float = 10.0) -> int:
    """Stop the warm hosts recorded in this Prefect home; how many were running."""
    stopped = []
    for record in records(env).glob("*.pid") if records(env).is_dir() else ():
        pid = int(record.stem)
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except ProcessLookupError:
            record.unlink(missing_ok=True)
    limit = time.monotonic() + timeout
    for pid in stopped:
        while time.monotonic() < limit:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
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
