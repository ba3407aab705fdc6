"""Whether a recorded pid is still the process that was recorded: a pid is reused once its process has exited, and
a record can outlive a reboot, so a pid alone may name anyone's process. A record keeps the process's start stamp
(boot id and start time); the process is the recorded one if its stamp is the same and its command line names what
it runs. Standard library only.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

PROC = Path("/proc")


def _boot_id() -> str:
    try:
        return (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""


def start_stamp(pid: int) -> str | None:
    """When the process started, as '<boot id>/<start time>'; None if no such process runs (or it is a zombie)."""
    if PROC.joinpath("self", "stat").is_file():
        try:
            stat = (PROC / str(pid) / "stat").read_text()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
        if fields[0] == "Z":
            return None
        return f"{_boot_id()}/{fields[19]}"  # field 22 of proc(5): start time in clock ticks since boot
    done = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, check=False)
    return done.stdout.strip() or None


def command_line(pid: int) -> str:
    """The process's command line, its arguments joined by spaces ('' if it is gone)."""
    if PROC.joinpath("self", "cmdline").is_file():
        try:
            return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return ""
    done = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def is_recorded_process(pid: int, stamp: str | None, marker: str) -> bool:
    """Whether pid is the process recorded with this start stamp, and its command line holds `marker`."""
    if not stamp or pid <= 0:
        return False
    return start_stamp(pid) == stamp and marker in command_line(pid)


def own_stamp() -> str | None:
    return start_stamp(os.getpid())
