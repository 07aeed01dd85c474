"""Shared test set-up: this folder is on sys.path, so tests import model_zoo.

A hung test, or a thread that holds the interpreter at exit, ends the run with every
thread's traceback instead of holding CI to its time limit with no clue where."""

from __future__ import annotations

import faulthandler
import os
import sys

import pytest

TEST_TIMEOUT_S = 1200  # the slowest test took 200 s on a loaded 2-core machine
EXIT_TIMEOUT_S = 120

_terminal: list[int] = []  # stderr as it was before pytest captured it


def pytest_configure(config: pytest.Config) -> None:
    _terminal.append(os.dup(sys.__stderr__.fileno()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True, file=_terminal[0])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.dump_traceback_later(EXIT_TIMEOUT_S, exit=True, file=_terminal[0])
