"""`wait_for`: poll a check until it yields a result, with a deadline that names what was awaited.

    from serving.waiting import wait_for
    port = wait_for(lambda: read_port(), timeout=30, what="the published port")

The one way the library and the tests wait for something that happens asynchronously (a server
answering, a log line arriving, a worker restarting), never with a fixed sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold in time. An AssertionError, so a test that waits fails, not errors."""


def wait_for(
    check: Callable[[], T | None], timeout: float, what: str = "the condition", interval: float = 0.05
) -> T:
    """Call `check()` every `interval` s until it returns something truthy, and return that.
    Raises WaitTimeout naming `what` after `timeout` s; an exception from `check` propagates at
    once (a check raises to say "this will never happen")."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
