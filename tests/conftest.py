"""Shared test set-up: this folder is on sys.path, so tests import model_zoo.

A hung test (its setup, call or teardown), or a thread that holds the interpreter at exit,
ends the run with every thread's traceback instead of holding CI to its time limit with no
clue where. The watchdog is a timer thread of its own: pytest's faulthandler plugin cancels
faulthandler's single timer whenever a test fails."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
from typing import Optional

import pytest

TEST_TIMEOUT_S = 1200  # the slowest test took 200 s on a loaded 2-core machine
EXIT_TIMEOUT_S = 120

_terminal: list[int] = []  # stderr as it was before pytest captured it
_timer: Optional[threading.Timer] = None


def _expire(what: str) -> None:
    fd = _terminal[0]
    os.write(fd, f"\n{what}: every thread's traceback follows, then the run ends\n".encode())
    faulthandler.dump_traceback(file=fd, all_threads=True)
    os._exit(1)


def _arm(seconds: float, what: str) -> None:
    global _timer
    if _timer is not None:
        _timer.cancel()
    _timer = threading.Timer(seconds, _expire, args=(what,))
    _timer.daemon = True  # it also runs while the interpreter waits for other threads at exit
    _timer.start()


def pytest_configure(config: pytest.Config) -> None:
    if not _terminal:
        _terminal.append(os.dup(sys.__stderr__.fileno()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    _arm(TEST_TIMEOUT_S, f"{item.nodeid} ran past {TEST_TIMEOUT_S} s")
    try:
        yield
    finally:
        _timer.cancel()


def pytest_unconfigure(config: pytest.Config) -> None:
    _arm(EXIT_TIMEOUT_S, f"the interpreter did not exit within {EXIT_TIMEOUT_S} s of the last test")
