"""Killing (or stopping) the worker processes of this test run's Ray, by title, for fault tests."""

from __future__ import annotations

import os
import signal


def kill_processes(title: bytes, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to the processes under this one (the Ray that the tests started, whose
    raylets are its children) whose title starts with ``title`` (Ray names an actor's worker
    process ``ray::<class>``, a Serve replica's ``ray::ServeReplica:<app>:<deployment>``);
    returns their pids. Another Ray on the same machine keeps its processes."""
    killed = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(title) and _descends_from(int(pid), os.getpid()):
                    os.kill(int(pid), sig)
                    killed.append(int(pid))
        except (OSError, ValueError):
            continue
    return killed


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        with open(f"/proc/{pid}/stat") as f:  # "pid (comm) state ppid ...": comm may hold spaces
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
        if pid == ancestor:
            return True
    return False
