"""Measuring one fan-out in this process: arrivals, results, CPU time and resident memory.

Only the standard library, anyio and cloudpickle: the original plugin's runs import this module
from a virtual environment of their own (:mod:`benchmarks.original_plugin`), where this project
is not installed. What runs an electron is the caller's (:class:`FanOut`'s ``call``).

The tasks cannot import ``benchmarks``: this module asks cloudpickle to send its functions (the
benchmark's electron) by value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import sys
import time
import traceback
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import cloudpickle

__all__ = ["FanOut", "FanOutLoad", "machine_load", "sleepy_electron"]

cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: How often the memory sampler reads the resident set size.
MEMORY_SAMPLE_SECONDS = 0.25
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_MB = 1024 * 1024


def sleepy_electron(index: int, seconds: float) -> int:
    """The benchmark's electron: sleep ``seconds``, return ``index + 1``."""
    if seconds > 0:
        import time

        time.sleep(seconds)
    return index + 1


def machine_load() -> list[float]:
    """The load averages over 1, 5 and 15 minutes, rounded."""
    return [round(value, 2) for value in os.getloadavg()]


@dataclasses.dataclass(frozen=True)
class FanOutLoad:
    """What reaches the executor: how many electrons, how fast, and how long each runs."""

    electrons: int  # fan-out size
    rate: float | None = None  # electrons per second (None: all at once)
    task_seconds: float = 0.0  # how long each electron's function sleeps
    trace_memory: bool = False  # also measure allocations with tracemalloc (slows it down)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_BYTES


@dataclasses.dataclass
class _Progress:
    """What the electrons and the memory sampler share during a run."""

    electrons: int  # fan-out size
    arrived: int = 0  # electrons whose run() started
    pending: int = 0  # electrons in run(), not yet returned
    rss_peak: int = 0  # highest resident set size sampled, bytes
    pending_at_peak: int = 0  # electrons pending when rss_peak was sampled
    rss_all_pending: int = 0  # highest RSS sampled while every electron was pending


async def _sample_memory(progress: _Progress, stop: anyio.Event) -> None:
    # A sampler wakes up on a period by nature; it synchronises nothing.
    while not stop.is_set():
        rss = _rss_bytes()
        if rss > progress.rss_peak:
            progress.rss_peak, progress.pending_at_peak = rss, progress.pending
        if progress.arrived == progress.electrons == progress.pending:
            progress.rss_all_pending = max(progress.rss_all_pending, rss)
        with anyio.move_on_after(MEMORY_SAMPLE_SECONDS):
            await stop.wait()


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(value for value in values if not math.isnan(value))
    if not ordered:
        return {}
    last = len(ordered) - 1
    return {f"p{q}": round(ordered[round(q / 100 * last)], 3) for q in (0, 10, 50, 90, 100)}


async def _nothing_left() -> None:
    """The executor has no work of its own after the last result."""


class FanOut:
    """The electrons of one run, on this process's event loop, and what they measure.

    :param load: how many electrons, at what pace
    :param call: runs electron ``index`` (``sleepy_electron(index, load.task_seconds)``) with a
        fresh executor, as Covalent does, and returns its value
    :param wait_idle: returns once the executor's own work after the last result (clean-up)
        is over; its CPU time counts
    """

    def __init__(
        self,
        load: FanOutLoad,
        call: Callable[[int], Awaitable[Any]],
        wait_idle: Callable[[], Awaitable[None]] = _nothing_left,
    ) -> None:
        self.load = load
        self.call = call
        self.wait_idle = wait_idle
        self.progress = _Progress(load.electrons)  # shared with the memory sampler
        self.arrived_at = [math.nan] * load.electrons  # seconds after the start, by index
        self.finished_at = [math.nan] * load.electrons  # result or error, by index
        self.failures: dict[int, str] = {}  # index -> what went wrong
        self.started = 0.0  # monotonic time of the first arrival
        self.first_traceback = ""  # of the first failure's innermost cause, for diagnosis

    async def run(self) -> dict[str, Any]:
        """Run every electron; wait for the executor to finish its clean-up; measure."""
        load, progress = self.load, self.progress
        rss_before = _rss_bytes()
        if load.trace_memory:
            tracemalloc.start()
        stop_sampling = anyio.Event()
        cpu_start = time.process_time()
        self.started = time.monotonic()
        async with anyio.create_task_group() as sampler:
            sampler.start_soon(_sample_memory, progress, stop_sampling)
            async with anyio.create_task_group() as tg:
                for index in range(load.electrons):
                    if load.rate and index:
                        # The arrival process is what is simulated here, at its own pace.
                        await anyio.sleep_until(self.started + index / load.rate)
                    tg.start_soon(self._electron, index)
            last_result = time.monotonic() - self.started
            cpu_to_last = time.process_time() - cpu_start
            await self.wait_idle()
            stop_sampling.set()
        idle_after = time.monotonic() - self.started
        cpu_total = time.process_time() - cpu_start
        traced_peak = tracemalloc.get_traced_memory()[1] if load.trace_memory else None
        tracemalloc.stop()
        succeeded = [t for i, t in enumerate(self.finished_at) if i not in self.failures]
        return {
            "succeeded": load.electrons - len(self.failures),
            "failed": len(self.failures),
            "errors_sample": [self.failures[i] for i in sorted(self.failures)[:5]],
            "first_error_traceback": self.first_traceback,
            "arrival_span_s": round(max(self.arrived_at), 3),
            "time_to_first_result_s": round(min(succeeded), 3) if succeeded else None,
            "time_to_last_result_s": round(last_result, 3),
            "completion_quantiles_s": _quantiles(self.finished_at),
            "idle_after_s": round(idle_after, 3),
            "cpu_s_to_last_result": round(cpu_to_last, 3),
            "cpu_s_total": round(cpu_total, 3),
            "cpu_ms_per_electron": round(1000 * cpu_total / load.electrons, 3),
            "rss_before_mb": _mb(rss_before),
            "rss_peak_mb": _mb(progress.rss_peak),
            "rss_peak_delta_mb": _mb(progress.rss_peak - rss_before),
            "rss_all_pending_mb": _mb(progress.rss_all_pending) or None,
            "rss_all_pending_delta_mb": (
                _mb(progress.rss_all_pending - rss_before) if progress.rss_all_pending else None
            ),
            "pending_at_peak": progress.pending_at_peak,
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "tracemalloc_peak_mb": None if traced_peak is None else _mb(traced_peak),
        }

    async def _electron(self, index: int) -> None:
        self.arrived_at[index] = time.monotonic() - self.started
        self.progress.arrived += 1
        self.progress.pending += 1
        try:
            value = await self.call(index)
            if value != index + 1:
                self.failures[index] = f"electron {index} returned {value!r}, not {index + 1}"
        except Exception as exc:
            self.failures[index] = f"electron {index}: {type(exc).__name__}: {exc}"[:500]
            if not self.first_traceback:
                self.first_traceback = _root_traceback(exc)
        self.finished_at[index] = time.monotonic() - self.started
        self.progress.pending -= 1


def _root_traceback(error: BaseException, limit: int = 6000) -> str:
    """The traceback of the innermost ``__cause__`` of ``error`` (where it really failed)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return "".join(traceback.format_exception(error))[-limit:]


def _mb(count: int) -> float:
    return round(count / _MB, 1)
