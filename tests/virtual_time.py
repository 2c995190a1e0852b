"""Controlled time for the scheduler tests: trio's MockClock, through anyio.

A module whose tests all run in virtual time defines its backend fixture with
:func:`mock_clock_backend` and bounds each test with :func:`fails_if_stuck`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import anyio
import trio.testing

#: Long enough for anything a test waits for; reaching it (virtual time) means it waits forever.
HANG = 100_000

AsyncTest = TypeVar("AsyncTest", bound=Callable[..., Awaitable[None]])


def mock_clock_backend() -> tuple[str, dict[str, Any]]:
    """trio with a clock that jumps to the next deadline whenever every task waits."""
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


def fails_if_stuck(test: AsyncTest) -> AsyncTest:
    """Fail a test that would wait forever: MockClock jumps to the HANG deadline at once."""

    @functools.wraps(test)
    async def bounded(*args: Any, **kwargs: Any) -> None:
        with anyio.fail_after(HANG):
            await test(*args, **kwargs)

    return cast(AsyncTest, bounded)
