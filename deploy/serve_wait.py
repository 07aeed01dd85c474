"""Waiting for the Serve application to come up, and failing at once on a user's mistake.

Serve retries a deployment whose replica's constructor raised (the engine host, which loads
the model) several times, each after the whole start, and then reports only that the
deployment failed; the reason stays in the Serve controller's log. A ``ValueError`` (raymoe's
kind for a mistake in the config, the checkpoint or the layout) fails the same way on every
retry, so the first one ends the wait with its own message. A cluster too small for the
layout is left to Serve's retries (an autoscaler may be adding nodes); when Serve gives up, the
``ClusterCapacityError`` the last one raised ends the wait with its own message, which says what
the cluster lacks. Serve's status message of a deployment carries the replica's traceback, which
ends in what the replica raised.
"""

from __future__ import annotations

import re
import time
from typing import Optional

from ray import serve
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview

from raymoe.cluster.placement import ClusterCapacityError

POLL_S = 0.5
# how Serve's status message of a deployment begins while a replica's constructor fails, and
# once Serve has given up on it (both end in the last failure's traceback)
FAILED_REPLICA = "A replica failed to start with exception"
GAVE_UP = "The deployment failed to start"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FRAME = '  File "'  # a traceback's frame line; its source lines follow, indented
# the exception a traceback ends in: its (dotted) class name, then its message if it has one
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*)(?:: (.*))?$")


def replica_exception(message: str) -> Optional[tuple[str, str]]:
    """(class name, message) of the exception a deployment's status ``message`` reports a
    replica's constructor raised (the exception the traceback ends in, not one it was
    handling); None for a message without a replica's traceback."""
    if FAILED_REPLICA not in message and GAVE_UP not in message:
        return None
    lines = _ANSI.sub("", message).splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith(_FRAME)]
    if not frames:
        return None
    # the first line below the last frame that is not indented (its source and ^^^ markers are)
    tail = lines[frames[-1] + 1 :]
    first = next((i for i, line in enumerate(tail) if line and not line[0].isspace()), None)
    found = None if first is None else _EXCEPTION_LINE.match(tail[first])
    if found is None:
        return None
    return found.group(1), "\n".join([found.group(2) or "", *tail[first + 1 :]]).strip()


def replica_mistake(message: str) -> Optional[ValueError]:
    """The ValueError a deployment's status ``message`` reports a replica's constructor raised
    (``replica_exception``), to raise here; None for anything else."""
    found = replica_exception(message)
    return ValueError(found[1]) if found is not None and found[0] == "ValueError" else None


def deploy_failure(app: str, status: ApplicationStatusOverview) -> Exception:
    """What to raise when Serve gave up on application ``app`` (``status``: its status): the
    ClusterCapacityError a replica raised last, with its own message, or a RuntimeError with
    Serve's message."""
    for deployment in status.deployments.values():
        found = replica_exception(deployment.message)
        if found is not None and found[0] == ClusterCapacityError.__name__:
            return ClusterCapacityError(found[1])
    return RuntimeError(f"deploying the Serve application {app!r} failed: {status.message}")


def wait_until_running(app: str) -> None:
    """Return once Serve application ``app`` runs. Raises the first user's mistake a replica
    raised (``replica_mistake``), or ``deploy_failure`` when Serve gives up on the application."""
    while True:
        status = serve.status().applications.get(app)
        if status is None:
            raise RuntimeError(f"the Serve application {app!r} is gone (deleted while it was starting)")
        if status.status == ApplicationStatus.RUNNING:
            return
        for deployment in status.deployments.values():
            mistake = replica_mistake(deployment.message)
            if mistake is not None:
                raise mistake
        if status.status == ApplicationStatus.DEPLOY_FAILED:
            raise deploy_failure(app, status)
        time.sleep(POLL_S)
