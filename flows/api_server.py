"""The project's local Prefect API server: Prefect's own API app (as its temporary server runs it) on loopback,
shared by every stage process and pipeline run that has no PREFECT_API_URL (flows/prefect_api.py starts it and
finds it again), until it has been idle for a while.

Idle means: no request for `--idle` seconds and no live process among its users (the processes that found or
started it register their pid under `--users`), so a long epoch that sends nothing keeps it up.

    python -m flows.api_server --port 8123 --idle 900 --users .prefect/dna-api-users   # what prefect_api starts
    python -m flows.api_server --stop      # stop the shared server of this Prefect home now
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from flows.processes import is_recorded_process

CHECK_EVERY_S = 2.0


def live_users(users: Path) -> list[int]:
    """The registered pids that are still the processes that registered (each file holds its process's start stamp,
    flows/processes.py); the files of the others are removed."""
    alive = []
    for entry in users.glob("*") if users.is_dir() else ():
        try:
            pid, stamp = int(entry.name), entry.read_text().strip()
        except (ValueError, OSError):
            entry.unlink(missing_ok=True)
            continue
        if is_recorded_process(pid, stamp, ""):
            alive.append(pid)
        else:
            entry.unlink(missing_ok=True)
    return alive


class IdleWatch:
    """The time of the last request (an ASGI middleware around the app) and whether the idle limit has passed."""

    def __init__(self, app, idle_s: float, users: Path):
        self.app, self.idle_s, self.users = app, idle_s, users
        self.last = time.monotonic()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.last = time.monotonic()
        await self.app(scope, receive, send)

    def idle(self) -> bool:
        if live_users(self.users):
            self.last = time.monotonic()
            return False
        return time.monotonic() - self.last > self.idle_s


def serve(port: int, idle_s: float, users: Path) -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    watch = IdleWatch(create_app(ephemeral=True, final=True), idle_s, users)
    server = uvicorn.Server(uvicorn.Config(watch, host="127.0.0.1", port=port, log_level="error", lifespan="on"))

    def stop_when_idle() -> None:
        while not server.should_exit:
            time.sleep(CHECK_EVERY_S)
            if watch.idle():
                server.should_exit = True

    threading.Thread(target=stop_when_idle, daemon=True).start()
    server.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int)
    parser.add_argument("--idle", type=float, default=900.0, help="seconds without requests or users before exit")
    parser.add_argument("--users", type=Path, help="folder of the pids of the processes using it")
    parser.add_argument("--stop", action="store_true", help="stop the shared server of this Prefect home")
    args = parser.parse_args(argv)
    if args.stop:
        from flows.prefect_api import stop_shared_server

        print("stopped the shared Prefect server" if stop_shared_server() else "no shared Prefect server runs")
        return 0
    if args.port is None or args.users is None:
        parser.error("--port and --users are required to serve")
    serve(args.port, args.idle, args.users)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
