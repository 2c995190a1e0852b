"""Load: N electrons through one executor process on the local cloud, nothing lost, resources
bounded. ``python -m benchmarks.load --electrons 10000`` (tests/test_load.py runs a smaller N).

Every electron gets a fresh executor, as in the Covalent server, and all of them run at once on
one event loop (a burst: the hardest case for the executor; Covalent's dispatcher starts them
as a trickle). Each returns the square of its input, checked on return. While they run, a
sampler reads this process's resident memory, open file descriptors and TCP sockets from
``/proc/self`` every half second.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import cloudpickle

__all__ = ["LoadReport", "ResourceSampler", "main", "run_load"]

# Tasks import nothing from benchmarks/: the function travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x: int) -> int:
    """The electron: short, and its result names its input."""
    return x * x


def rss_mb() -> float:
    """This process's resident memory, in MB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds() -> tuple[int, int]:
    """This process's open file descriptors, and how many of them are sockets."""
    fds = sockets = 0
    for entry in os.scandir("/proc/self/fd"):
        fds += 1
        try:
            if os.readlink(entry.path).startswith("socket:"):
                sockets += 1
        except OSError:
            pass  # closed meanwhile
    return fds, sockets


@dataclass
class ResourceSampler:
    """Peaks of this process's memory, descriptors and sockets while it runs."""

    interval: float = 0.5  # seconds between samples
    rss_start_mb: float = 0.0  # before the run
    rss_peak_mb: float = 0.0  # the highest sample
    fds_start: int = 0  # descriptors before the run
    fds_peak: int = 0  # the most descriptors open at a sample
    sockets_start: int = 0  # sockets before the run (a test process has others open)
    sockets_peak: int = 0  # the most sockets open at a sample
    samples: list[tuple[float, float, int, int]] = field(default_factory=list)  # t, MB, fds, socks

    def start(self) -> None:
        self.rss_start_mb = self.rss_peak_mb = rss_mb()
        self.fds_start, self.sockets_start = open_fds()

    def sample(self, elapsed: float) -> None:
        memory, (fds, sockets) = rss_mb(), open_fds()
        self.samples.append((round(elapsed, 1), round(memory, 1), fds, sockets))
        self.rss_peak_mb = max(self.rss_peak_mb, memory)
        self.fds_peak = max(self.fds_peak, fds)
        self.sockets_peak = max(self.sockets_peak, sockets)

    async def run(self, started: float) -> None:
        while True:
            self.sample(time.monotonic() - started)
            await anyio.sleep(self.interval)


@dataclass
class LoadReport:
    """What a load run measured."""

    electrons: int  # electrons submitted
    right: int  # electrons that returned their own right value
    wrong: list[str]  # what the others got (at most 20 shown)
    wall_seconds: float  # first submission to last outcome
    jobs_created: int  # Batch jobs (emulator count)
    task_attempts: int  # task attempts (emulator count)
    api_calls: dict[str, int]  # Batch API calls by method
    rss_start_mb: float  # executor process memory before the run
    rss_peak_mb: float  # ... at its highest
    rss_end_mb: float  # ... after the run and a garbage collection
    fds_start: int  # file descriptors before
    fds_peak: int  # ... at their most
    fds_end: int  # ... after
    sockets_start: int  # TCP sockets before
    sockets_peak: int  # TCP sockets at their most
    samples: list[tuple[float, float, int, int]]  # (seconds, MB, fds, sockets) over time


async def run_load(
    cloud: Any,
    electrons: int,
    *,
    executor_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> LoadReport:
    """Run ``electrons`` electrons at once through this process and check every outcome.

    :param cloud: a running :class:`~covalent_gcpbatch_array.local.LocalCloud`
    :param executor_options: executor settings over the cloud's (poll_freq, batch_window, ...)
    """
    import covalent  # noqa: F401  (as the Covalent server does, before the plugin)

    from covalent_gcpbatch_array._core.compat import give_task_streams
    from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor

    options: dict[str, Any] = {"poll_freq": 1.0, "batch_window": 2.0, "retries": 0}
    options |= cloud.executor_config() | (executor_options or {})
    before = cloud.stats()
    sampler = ResourceSampler()
    sampler.start()
    right = 0
    wrong: list[str] = []
    started = time.monotonic()

    async def one(x: int) -> None:
        nonlocal right
        executor = GCPBatchArrayExecutor(**options)
        give_task_streams(executor)
        try:
            value = await executor.run(square, [x], {}, {"dispatch_id": "load", "node_id": x})
        except Exception as exc:
            value = exc
        if value == x * x:
            right += 1
        elif len(wrong) < 20:
            wrong.append(f"electron {x}: {value!r}")
        else:
            wrong.append("")
        done = right + len(wrong)
        if progress and done % max(1, electrons // 10) == 0:
            progress(f"{done}/{electrons} done after {time.monotonic() - started:.0f} s")

    async with anyio.create_task_group() as outer:
        outer.start_soon(sampler.run, started)
        async with anyio.create_task_group() as tg:
            for x in range(electrons):
                tg.start_soon(one, x)
        wall = time.monotonic() - started
        outer.cancel_scope.cancel()
    after = cloud.stats()
    gc.collect()
    fds_end, _ = open_fds()
    calls = {
        method: after["api_calls"][method] - before["api_calls"].get(method, 0)
        for method in after["api_calls"]
    }
    return LoadReport(
        electrons=electrons,
        right=right,
        wrong=[entry for entry in wrong if entry],
        wall_seconds=round(wall, 1),
        jobs_created=after["jobs_created"] - before["jobs_created"],
        task_attempts=after["task_attempts"] - before["task_attempts"],
        api_calls={method: count for method, count in calls.items() if count},
        rss_start_mb=round(sampler.rss_start_mb, 1),
        rss_peak_mb=round(sampler.rss_peak_mb, 1),
        rss_end_mb=round(rss_mb(), 1),
        fds_start=sampler.fds_start,
        sockets_start=sampler.sockets_start,
        fds_peak=sampler.fds_peak,
        fds_end=fds_end,
        sockets_peak=sampler.sockets_peak,
        samples=sampler.samples,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the load from the command line and print the report as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__)
    parser.add_argument("--electrons", type=int, default=10_000)
    parser.add_argument("--max-running-tasks", type=int, default=64)
    parser.add_argument("--max-tasks-per-job", type=int, default=1000)
    parser.add_argument("--poll-freq", type=float, default=1.0)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    from covalent_gcpbatch_array.local import LocalCloud

    async def measure() -> LoadReport:
        async with LocalCloud(max_running_tasks=args.max_running_tasks) as cloud:
            return await run_load(
                cloud,
                args.electrons,
                executor_options={
                    "max_tasks_per_job": args.max_tasks_per_job,
                    "poll_freq": args.poll_freq,
                },
                progress=lambda line: print(line, file=sys.stderr, flush=True),
            )

    report = anyio.run(measure)
    text = json.dumps(asdict(report) | {"max_running_tasks": args.max_running_tasks}, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
