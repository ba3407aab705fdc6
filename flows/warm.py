"""The command side of the warm host (flows/warm_host.py): `python -m flows.<module>` handed to a fork of a process
that has imported torch, timm, Prefect, MLflow and the flows already, before this process imports any of them.

Standard library only (and the step table, flows/steps.py, which imports nothing heavy): it runs while the `flows`
package is imported, before anything else.

Only the user who started a host can use it: its socket is 0600 in a folder of that user's alone (0700, checked
before use), and the host checks the uid of every peer (SO_PEERCRED). It runs only the project's steps
(`served_modules`); any other module runs in the command's own process.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("dna", "flows")
ENTRY_POINTS = ("flows.pipeline",)  # run by hand (`make run`), not by a DVC stage: the other served module
# Variables that differ between otherwise equal commands and that nothing reads at import time (the pipeline's
# MLflow run is read when a step starts its own: flows/tracking.py).
VOLATILE = frozenset({"_", "PWD", "OLDPWD", "SHLVL", "TERM", "COLUMNS", "LINES", "PS1", "SSH_TTY", "DVC_STAGE",
                      "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DNA_MLFLOW_PARENT_RUN_ID"})
START_TIMEOUT_S = 180.0
HEADER = 8  # bytes of the request's length


def enabled() -> bool:
    return os.environ.get("DNA_WARM", "1").lower() not in ("0", "false", "no", "off") and hasattr(os, "fork")


def idle_s() -> float:
    return float(os.environ.get("DNA_WARM_IDLE_S", 600))


def requested_module() -> str | None:
    """The module of `python -m <module>` while its package is being imported, else None."""
    if sys.argv[:1] != ["-m"]:
        return None
    argv = list(getattr(sys, "orig_argv", []))
    for i, arg in enumerate(argv[1:-1], 1):
        if arg == "-m":
            return argv[i + 1]
        if arg.startswith("-m") and len(arg) > 2:
            return arg[2:]
    return None


def script_args() -> list[str]:
    """The arguments after `-m <module>` of this process's command line."""
    argv = list(sys.orig_argv)
    for i, arg in enumerate(argv[1:], 1):
        if arg == "-m":
            return argv[i + 2:]
        if arg.startswith("-m") and len(arg) > 2:
            return argv[i + 1:]
    return []


def code_stamp(root: Path = ROOT) -> list:
    stamp = []
    for package in CODE:
        for folder, dirs, files in os.walk(root / package):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    info = os.stat(os.path.join(folder, name))
                    stamp.append((os.path.relpath(os.path.join(folder, name), root), info.st_size, info.st_mtime_ns))
    return stamp


def key(env: dict[str, str] | None = None, cwd: str | None = None) -> str:
    """What a host must share with a command to serve it (see the module's docstring)."""
    import sysconfig

    env = os.environ if env is None else env
    packages = Path(sysconfig.get_paths()["purelib"])
    parts = {"root": str(ROOT), "cwd": cwd or os.getcwd(), "python": sys.executable, "path": sys.path[1:],
             "packages": packages.stat().st_mtime_ns if packages.is_dir() else None, "code": code_stamp(ROOT),
             "env": sorted((k, v) for k, v in env.items() if k not in VOLATILE)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def served_modules() -> frozenset[str]:
    """The modules a host runs: the steps of the stage table (flows/steps.py, optional ones included) and the
    pipeline flow."""
    from flows.steps import OPTIONAL_STEPS, STEPS

    return frozenset(f"flows.{step.module}" for step in (*STEPS, *OPTIONAL_STEPS)) | frozenset(ENTRY_POINTS)


def private_folder() -> Path | None:
    """The folder of this user's host sockets (made 0700 in the temporary folder); None, saying why, if it is not
    this user's alone: another user made it, or opened it up."""
    folder = Path(tempfile.gettempdir()) / f"dna-warm-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        print(f"warm host: {folder} is not a folder of uid {os.getuid()} alone (owner {info.st_uid}, mode "
              f"{stat.filemode(info.st_mode)}); running without it", file=sys.stderr)
        return None
    return folder


def socket_path(host_key: str, folder: Path) -> Path:
    return folder / f"{host_key}.sock"


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (None where the system does not say)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def records(env: dict[str, str] | None = None) -> Path:
    """The folder where the hosts of this Prefect home record themselves (for --stop)."""
    env = os.environ if env is None else env
    return Path(env.get("PREFECT_HOME", ROOT / ".prefect")).expanduser() / "dna-warm-hosts"


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    data = len(data).to_bytes(HEADER, "big") + data
    if fds:
        socket.send_fds(sock, [data[:1]], fds)
        data = data[1:]
    sock.sendall(data)


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        uid = peer_uid(sock)
    except OSError:
        sock.close()
        return None
    if uid is not None and uid != os.getuid():  # not our host: it would get our environment and streams
        sock.close()
        return None
    return sock


def _start_host(host_key: str, path: Path) -> socket.socket | None:
    """Start the host of this key (one starter at a time) and wait until it accepts; None if it did not start."""
    import fcntl

    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is not None:
            return sock
        home = records()
        home.mkdir(parents=True, exist_ok=True)
        log = home / f"{host_key}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-c", "import sys; from flows.warm_host import main; sys.exit(main(sys.argv[1:]))",
                 "--serve", str(path), "--idle", str(idle_s())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        limit = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < limit:
            sock = _connect(path)
            if sock is not None:
                return sock
            if process.poll() is not None:
                break
            time.sleep(0.05)
        print(f"warm host did not start (see {log}); running without it", file=sys.stderr)
        return None


def delegate(module: str, args: list[str]) -> int | None:
    """Run `python -m module args` in a fork of the warm host; its exit status, or None when no host can serve it
    (the caller then runs the module itself)."""
    folder = private_folder()
    if folder is None:
        return None
    host_key = key()
    path = socket_path(host_key, folder)
    sock = _connect(path) or _start_host(host_key, path)
    if sock is None:
        return None
    with sock:
        _send(sock, {"module": module, "argv": args, "cwd": os.getcwd(), "env": dict(os.environ)},
              [sys.stdin.fileno(), sys.stdout.fileno(), sys.stderr.fileno()])
        reader = sock.makefile("r")
        started = reader.readline()
        if not started:
            return None  # the host went away before forking (e.g. it was stopping) or refused: run here
        pid = json.loads(started)["pid"]

        def forward(signum, _frame):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, forward)
        while True:
            try:
                line = reader.readline()
                break
            except InterruptedError:
                continue
        if not line:
            print(f"warm host lost step process {pid}", file=sys.stderr)
            return 1
        return int(json.loads(line)["status"])


def delegate_from_package_import() -> None:
    """Called by flows/__init__.py: when this process is `python -m flows.<module>`, hand it to the warm host and
    exit with the step's status."""
    module = requested_module()
    if module is None or not module.startswith("flows.") or not enabled() or module not in served_modules():
        return
    status = delegate(module, script_args())
    if status is not None:
        sys.stdout.flush()
        raise SystemExit(status)


