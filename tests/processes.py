"""Killing (or stopping) this machine's Ray worker processes by title, for fault tests."""

from __future__ import annotations

import os
import signal


def kill_processes(title: bytes, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to this machine's processes whose title starts with ``title`` (Ray names an
    actor's worker process ``ray::<class>``, a Serve replica's
    ``ray::ServeReplica:<app>:<deployment>``); returns their pids."""
    killed = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(title):
                    os.kill(int(pid), sig)
                    killed.append(int(pid))
        except (OSError, ValueError):
            continue
    return killed
