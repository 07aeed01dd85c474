"""Waiting for the Serve application to come up, and failing at once on a user's mistake.

Serve retries a deployment whose replica's constructor raised (the engine host, which loads
the model) several times, each after the whole start, and then reports only that the
deployment failed; the reason stays in the Serve controller's log. A ``ValueError`` (raymoe's
kind for a mistake in the config, the checkpoint or the layout) or a ``ClusterCapacityError``
fails the same way on every retry, so the first one ends the wait with its own message.
Serve's status message of a deployment carries the replica's traceback, whose last
exception line is what the replica raised.
"""

from __future__ import annotations

import re
import time
from typing import Optional

from ray import serve
from ray.serve.schema import ApplicationStatus

from raymoe.cluster.placement import ClusterCapacityError

POLL_S = 0.5
# how Serve's status message of a deployment begins while a replica's constructor fails
FAILED_REPLICA = "A replica failed to start with exception"
USER_MISTAKES: dict[str, type[Exception]] = {"ValueError": ValueError, "ClusterCapacityError": ClusterCapacityError}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# a traceback's exception line: a (dotted) name ending in Error or Exception, then its message
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.*)$")


def replica_mistake(message: str) -> Optional[Exception]:
    """The user's mistake a deployment's status ``message`` reports (a replica's constructor
    raised it), as the exception to raise here; None for anything else."""
    if FAILED_REPLICA not in message:
        return None
    lines = _ANSI.sub("", message).splitlines()
    for i in range(len(lines) - 1, -1, -1):
        found = _EXCEPTION_LINE.match(lines[i])
        if found is not None:  # the innermost exception: the traceback's last
            kind = USER_MISTAKES.get(found.group(1))
            text = "\n".join([found.group(2), *lines[i + 1 :]]).strip()
            return kind(text) if kind is not None else None
    return None


def wait_until_running(app: str) -> None:
    """Return once Serve application ``app`` runs. Raises the first user's mistake a replica
    raised (``replica_mistake``), or RuntimeError when Serve gives up on the application."""
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
            raise RuntimeError(f"deploying the Serve application {app!r} failed: {status.message}")
        time.sleep(POLL_S)
