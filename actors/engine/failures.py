"""How the engine fails and comes back: its errors, what clients are told of a failure,
and how many restarts of the ranks it may try."""

from __future__ import annotations

import collections
import time


class StepTimeoutError(RuntimeError):
    """A step took longer than engine.step_timeout_s: a rank is hung."""


class EngineStopped(RuntimeError):
    """The engine was shut down."""


def describe_failure(e: BaseException) -> str:
    """What failed, for clients and /health: no actor ids, pids or addresses (the log has those)."""
    if isinstance(e, (StepTimeoutError, EngineStopped)):
        return str(e)
    name = type(e).__name__
    if any(k in name for k in ("ActorDied", "RayActorError", "ActorUnavailable", "NodeDied", "WorkerCrashed")):
        return "a rank process died"
    return f"a step raised {name}"


class RestartBudget:
    """At most ``max_restarts`` within any ``window_s`` seconds, and at most ``max_restarts``
    failed ones in a row (a restart that fails after a load timeout may outlast the window)."""

    def __init__(self, max_restarts: int, window_s: float) -> None:
        self.max_restarts, self.window_s = max_restarts, window_s
        self._times: collections.deque[float] = collections.deque()
        self.failed_in_a_row = 0

    def take(self) -> bool:
        now = time.monotonic()
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts or self.failed_in_a_row >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    def settle(self, succeeded: bool) -> None:
        """How the restart taken last ended."""
        self.failed_in_a_row = 0 if succeeded else self.failed_in_a_row + 1
