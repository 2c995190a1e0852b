"""Waiting for another process's state: the one poll-until helper of the tests.

Polling is for state this process cannot await (a server's job, a file a task writes, a pid);
the timeout only keeps a broken run from hanging, it is never the thing a test measures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from google.cloud import batch_v1

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    *,
    what: str | Callable[[], object] = "",
    timeout: float = 30.0,
    interval: float = 0.02,
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    :param what: what is awaited, for the failure message (a callable is called then, to say
        what was seen last)
    :raises AssertionError: nothing truthy within ``timeout`` seconds
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what or getattr(predicate, "__name__", "")
            raise AssertionError(f"timed out after {timeout} s waiting for {described}")
        time.sleep(interval)


#: The states a Batch job ends in.
ENDED = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


def job_reached(
    client: batch_v1.BatchServiceClient,
    name: str,
    states: Collection[str] = ENDED,
    *,
    timeout: float = 60.0,
) -> batch_v1.Job:
    """The Batch job ``name`` once its state (by name: ``"RUNNING"``) is one of ``states``."""
    last: list[batch_v1.Job] = []

    def reached() -> batch_v1.Job | None:
        last[:] = [client.get_job(name=name)]
        return last[0] if last[0].status.state.name in states else None

    return wait_until(
        reached,
        what=lambda: f"{name} to reach {sorted(states)}; last: {last[0].status if last else None}",
        timeout=timeout,
        interval=0.05,
    )
