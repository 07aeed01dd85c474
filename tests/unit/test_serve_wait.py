"""Reading a user's mistake out of Serve's status message of a deployment whose replica's
constructor raised. The message holds Python's own traceback text (``traceback.format_exc``,
as Serve's replica wrapper writes it), which ends in what the replica raised; Ray's actor
error line sits above it. tests/ray/test_cli_errors.py reads a message Serve wrote."""

from __future__ import annotations

import traceback

import pytest

from raymoe.cluster.placement import ClusterCapacityError
from raymoe.deploy.serve_wait import FAILED_REPLICA, replica_mistake


def _wrapped_last(error: Exception) -> str:
    """A message whose traceback ends in a RuntimeError raised while handling ``error``, its
    text ANSI-coloured as Ray's task errors are."""
    try:
        try:
            raise error
        except Exception:
            raise RuntimeError("\x1b[36mray::ServeReplica:raymoe:EngineHost()\x1b[39m")  # noqa: B904 (chained on purpose)
    except RuntimeError:
        text = traceback.format_exc()
    return f"{FAILED_REPLICA}. Retrying 2 more time(s). Error:\n{text}"


def _cause_last(error: Exception) -> str:
    """A message whose traceback ends in ``error``, as Serve's does."""
    try:
        raise error
    except Exception:
        text = traceback.format_exc()
    return f"{FAILED_REPLICA}. Retrying 3 more time(s). Error:\nray.exceptions.RayTaskError(X): ...\n{text}"


def test_a_value_error_is_the_mistake_with_its_whole_message():
    got = replica_mistake(_cause_last(ValueError("architecture 'NoSuch' is not supported;\nraymoe supports Foo")))
    assert isinstance(got, ValueError)
    assert str(got) == "architecture 'NoSuch' is not supported;\nraymoe supports Foo"


def test_a_capacity_error_keeps_its_kind():
    got = replica_mistake(_cause_last(ClusterCapacityError("Ray could not place the rank actors within 300 s")))
    assert type(got) is ClusterCapacityError and str(got).startswith("Ray could not place")


def test_only_the_innermost_exception_counts():
    # the last exception line is the RuntimeError that wraps the ValueError: not a mistake of the user's
    assert replica_mistake(_wrapped_last(ValueError("bad"))) is None
    assert replica_mistake(_cause_last(RuntimeError("CUDA error: out of memory"))) is None
    assert replica_mistake(_cause_last(KeyError("x"))) is None


def test_other_messages_are_not_mistakes():
    assert replica_mistake("") is None
    assert replica_mistake("Deployment 'EngineHost' is waiting for resources. ValueError: x") is None


@pytest.mark.parametrize("kind", [ValueError, ClusterCapacityError])
def test_ansi_colour_does_not_hide_the_line(kind):
    message = _cause_last(kind("it")).replace(f"{kind.__name__}: it", f"\x1b[31m{kind.__name__}: it\x1b[0m")
    assert type(replica_mistake(message)) is kind
