"""Reading a user's mistake out of Serve's status message of a deployment whose replica's
constructor raised. The message holds Python's own traceback text (``traceback.format_exc``,
as Serve's replica wrapper writes it), which ends in what the replica raised; Ray's actor
error line sits above it. Only a ValueError ends the wait; tests/ray/test_cli_errors.py reads
a message Serve wrote. When Serve gives up on the application, a ClusterCapacityError the
replica raised is what the wait raises, with its own message."""

from __future__ import annotations

import traceback
from types import SimpleNamespace

import pytest

from raymoe.cluster.placement import ClusterCapacityError
from raymoe.deploy.serve_wait import FAILED_REPLICA, GAVE_UP, deploy_failure, replica_mistake


def _message(raise_it) -> str:
    """Serve's message for a replica whose constructor ran ``raise_it``, with Ray's
    ANSI-coloured actor error line above the traceback."""
    try:
        raise_it()
    except BaseException:
        text = traceback.format_exc()
    ray_line = "ray.exceptions.RayTaskError(X): \x1b[36mray::Controller.load_model()\x1b[39m"
    return f"{FAILED_REPLICA}. Retrying 3 more time(s). Error:\n{ray_line}\n{text}"


def _raise(error: BaseException):
    def run():
        raise error

    return run


def _while_handling(first: BaseException, then: BaseException):
    def run():
        try:
            raise first
        except BaseException:
            raise then  # noqa: B904 (chained on purpose)

    return run


def test_a_value_error_is_the_mistake_with_its_whole_message():
    got = replica_mistake(_message(_raise(ValueError("architecture 'NoSuch' is not supported;\nraymoe supports Foo"))))
    assert isinstance(got, ValueError)
    assert str(got) == "architecture 'NoSuch' is not supported;\nraymoe supports Foo"


@pytest.mark.parametrize(
    "raise_it",
    [
        _raise(ClusterCapacityError("Ray could not place the rank actors within 60 s")),  # an autoscaler may help
        _raise(RuntimeError("CUDA error: out of memory")),
        _raise(KeyError("x")),
        _raise(TimeoutError()),  # no message: its line is the bare name
        _while_handling(ValueError("bad"), TimeoutError()),  # what it raised, not what it handled
        _while_handling(ValueError("bad"), RuntimeError("wrapped")),
        _raise(RuntimeError("rank 1 failed:\nValueError: internal")),  # a ValueError line in the message
    ],
)
def test_anything_else_is_not_a_mistake(raise_it):
    assert replica_mistake(_message(raise_it)) is None


def test_a_value_error_raised_while_handling_another_error_counts():
    got = replica_mistake(_message(_while_handling(KeyError("x"), ValueError("model.path: no config.json"))))
    assert isinstance(got, ValueError) and str(got) == "model.path: no config.json"


def test_other_messages_are_not_mistakes():
    assert replica_mistake("") is None
    assert replica_mistake("Deployment 'EngineHost' is waiting for resources.\nValueError: x") is None
    assert replica_mistake(f"{FAILED_REPLICA}. Error:\nValueError: no traceback above it") is None


def test_ansi_colour_does_not_hide_the_line():
    message = _message(_raise(ValueError("it"))).replace("ValueError: it", "\x1b[31mValueError: it\x1b[0m")
    assert str(replica_mistake(message)) == "it"


APP_FAILED = "Failed to update the deployments ['EngineHost']."  # Serve's message of the application


def _gave_up(raise_it) -> SimpleNamespace:
    """An application's status after Serve gave up on its engine host, whose replica's
    constructor ran ``raise_it`` (Serve's message, as ray 2.60 writes it)."""
    failed = _message(raise_it).split("Error:\n", 1)[1]
    engine_host = SimpleNamespace(
        message=f"{GAVE_UP} 3 times in a row. This may be due to a problem with its constructor or initial "
        f"health check failing. See controller logs for details. Error:\n{failed}"
    )
    ingress = SimpleNamespace(message="Deployment 'OpenAIIngress' has 1 replicas that have taken more than 30s")
    deployments = {"EngineHost": engine_host, "OpenAIIngress": ingress}
    return SimpleNamespace(message=APP_FAILED, deployments=deployments)


def test_a_cluster_too_small_is_the_reason_serve_gave_up():
    reason = "Ray could not place the rank actors within 60 s (parallel.placement_timeout_s): the layout needs 2 GPU"
    got = deploy_failure("raymoe", _gave_up(_raise(ClusterCapacityError(reason))))
    assert isinstance(got, ClusterCapacityError) and str(got) == reason


def test_anything_else_serve_gave_up_on_is_serves_message():
    got = deploy_failure("raymoe", _gave_up(_raise(RuntimeError("CUDA error: out of memory"))))
    assert type(got) is RuntimeError
    assert str(got) == f"deploying the Serve application 'raymoe' failed: {APP_FAILED}"
