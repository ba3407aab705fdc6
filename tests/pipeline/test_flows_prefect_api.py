"""One local Prefect server per Prefect home, shared by the processes that have no PREFECT_API_URL: the first
starts it, the next finds it, and it stops by itself once idle."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from pipeline_support import ROOT

from flows.api_server import IdleWatch, live_users
from flows.prefect_api import RECORD, USERS, SharedServer, healthy, recorded_server, stop_shared_server
from flows.processes import start_stamp

ASK = "from flows.prefect_api import prefect_api_url; print(prefect_api_url())"


def ask_for_api(home, idle_s: float) -> str:
    """In a fresh process without PREFECT_API_URL: the API it would report to (starting the server if needed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(home), "DNA_PREFECT_IDLE_S": str(idle_s), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", ASK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def gone(pid: int, within_s: float) -> bool:
    limit = time.monotonic() + within_s
    while time.monotonic() < limit:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_the_second_process_finds_the_server_the_first_started_and_it_stops_when_idle(tmp_path):
    home = tmp_path / "prefect"
    try:
        first = ask_for_api(home, idle_s=8)
        pid = json.loads((home / RECORD).read_text())["pid"]
        second = ask_for_api(home, idle_s=8)
        assert first == second and first.startswith("http://127.0.0.1:") and healthy(first)
        assert json.loads((home / RECORD).read_text())["pid"] == pid  # found, not started again
        assert gone(pid, within_s=60), "the server did not stop once its users were gone and it was idle"
        assert recorded_server(home) is None and not healthy(first, timeout=0.5)
    finally:
        stop_shared_server(home)


def test_idle_only_without_requests_and_without_live_users(tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    watch = IdleWatch(app=None, idle_s=0.0, users=users)
    (users / str(os.getpid())).write_text(start_stamp(os.getpid()))  # as SharedServer.use registers
    assert live_users(users) == [os.getpid()] and not watch.idle()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (users / finished.stdout.strip()).write_text("boot/1")
    (users / str(os.getpid())).unlink()
    time.sleep(0.01)
    assert watch.idle() and list(users.iterdir()) == []  # a finished user's file is removed


def test_a_recorded_pid_that_is_not_the_server_is_neither_trusted_nor_signalled(tmp_path):
    home = tmp_path / "prefect"
    home.mkdir()
    bystander = subprocess.Popen(["sleep", "60"])  # has the pid a server recorded before it exited (or a reboot)
    try:
        for stamp in ("boot/1", start_stamp(bystander.pid), None):  # another start; not a server's command line
            (home / RECORD).write_text(json.dumps({"url": "http://127.0.0.1:9/api", "pid": bystander.pid,
                                                   "stamp": stamp}))
            assert recorded_server(home) is None  # a stage starts a server instead of waiting for this one
            assert stop_shared_server(home, timeout=1) is False
            assert bystander.poll() is None, "a process that is not the server was signalled"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_user_whose_pid_was_reused_does_not_keep_the_server_up(tmp_path):
    users = tmp_path / USERS
    users.mkdir()
    (users / str(os.getpid())).write_text(start_stamp(os.getpid()))  # this process, as SharedServer.use registers
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (users / str(bystander.pid)).write_text("boot/1")  # a user of another boot, or one that has exited
        (users / "12x").write_text("")
        assert live_users(users) == [os.getpid()]
        assert sorted(p.name for p in users.iterdir()) == [str(os.getpid())]
        (users / str(os.getpid())).unlink()
        SharedServer("http://127.0.0.1:9/api", 1, None, tmp_path).use()
        assert live_users(users) == [os.getpid()]
    finally:
        bystander.kill()
        bystander.wait()
