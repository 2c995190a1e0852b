"""One fan-out on a fresh local cloud, measured: ``python -m benchmarks.harness --spec JSON``.

The electrons run as in the Covalent server: a fresh executor per electron, every ``run()`` a
task of one event loop. What is measured:

- from the Batch emulator: jobs created, API calls by method (refused ones too), task attempts;
- from fake-gcs-server's request log: storage operations by kind, executor's and tasks' alike;
- in this process, which is the executor's (the emulator, its tasks and fake-gcs-server are
  other processes, so their CPU and memory are not counted): the time from the first arrival
  to the first and to the last result, CPU time (``time.process_time``, all threads) and
  resident memory (sampled from ``/proc/self/statm``; optionally ``tracemalloc``).

A child process per run keeps these clean: ``ru_maxrss`` and the executor's module-level state
start fresh. :mod:`benchmarks.suite` starts the children.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
import tracemalloc
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio

from covalent_gcpbatch_array.config import DEFAULTS

__all__ = ["Arrival", "Mode", "RunSpec", "run_fanout", "sleepy_electron"]

#: How often the memory sampler reads the resident set size.
MEMORY_SAMPLE_SECONDS = 0.25
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_MB = 1024 * 1024


class Mode(str, enum.Enum):
    """How electrons are packed into Batch jobs."""

    BATCHED = "batched"  # the executor's coalescing (the knobs of the spec)
    BASELINE = "baseline"  # one job per electron: max_tasks_per_job = 1


class Arrival(str, enum.Enum):
    """How electrons reach the executor."""

    BURST = "burst"  # all at once
    TRICKLE = "trickle"  # one every 1/rate seconds, as Covalent's dispatcher starts them
    COVALENT = "covalent"  # dispatched through a real Covalent server, at its own pace


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One fan-out to run and measure."""

    name: str  # file stem of the result in benchmarks/results/
    group: str  # which table or plot it belongs to: sizes, trickle, sweep, ...
    mode: Mode  # batched or baseline
    electrons: int  # fan-out size
    arrival: Arrival = Arrival.BURST  # burst or trickle
    rate: float = 2.0  # electrons per second, for trickle arrival
    provisioning_delay: float = 30.0  # seconds from job creation to its first task (a VM boot)
    jobs_per_minute: int | None = 20  # the emulator's job-creation quota (None: none)
    max_running_tasks: int | None = 8  # tasks running at once on this machine (None: no cap)
    task_seconds: float = 0.0  # how long each electron's function sleeps
    batch_window: float = float(DEFAULTS["batch_window"])  # executor knob
    batch_idle_gap: float = float(DEFAULTS["batch_idle_gap"])  # executor knob
    max_tasks_per_job: int = int(DEFAULTS["max_tasks_per_job"])  # executor knob (batched mode)
    poll_freq: float = float(DEFAULTS["poll_freq"])  # executor knob
    keep_objects: bool = bool(DEFAULTS["keep_objects"])  # executor knob: skip the clean-up
    trace_memory: bool = False  # also measure the executor's own allocations (slows it down)

    def executor_settings(self) -> dict[str, Any]:
        """The executor keywords of this run, beyond the cloud's endpoints."""
        return {
            "batch_window": self.batch_window,
            "batch_idle_gap": self.batch_idle_gap,
            "max_tasks_per_job": 1 if self.mode is Mode.BASELINE else self.max_tasks_per_job,
            "poll_freq": self.poll_freq,
            "keep_objects": self.keep_objects,
            "retries": 0,
        }

    @property
    def arrival_span(self) -> float:
        """Seconds from the first electron's arrival to the last one's."""
        if self.arrival is Arrival.TRICKLE:
            return (self.electrons - 1) / self.rate
        return 0.0  # a burst; for Covalent, the measured span replaces it

    @property
    def target_seconds(self) -> float:
        """The physical limit for the batched mode: arrival span + window + provisioning delay
        + task time + one poll period (issue 5's yardstick)."""
        return (
            self.arrival_span
            + self.batch_window
            + self.provisioning_delay
            + self.task_seconds
            + self.poll_freq
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (enums as their values)."""
        return {
            field.name: getattr(self, field.name).value
            if isinstance(getattr(self, field.name), enum.Enum)
            else getattr(self, field.name)
            for field in dataclasses.fields(self)
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSpec:
        """The spec that :meth:`to_json` wrote."""
        values = dict(data)
        values["mode"] = Mode(values["mode"])
        values["arrival"] = Arrival(values.get("arrival", Arrival.BURST))
        return cls(**values)


def sleepy_electron(index: int, seconds: float) -> int:
    """The benchmark's electron: sleep ``seconds``, return ``index + 1``."""
    if seconds > 0:
        import time

        time.sleep(seconds)
    return index + 1


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


async def _wait_executor_idle() -> None:
    """Wait until the executor's batch service of this loop has stopped.

    The service ends once no electron waits and every job monitor has finished (jobs deleted,
    objects cleaned up); that clean-up is executor work, so the CPU count includes it, and the
    cloud must not stop under it.
    """
    from covalent_gcpbatch_array._core.runtime import ExecutorRuntime

    await ExecutorRuntime.wait_idle()


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(value for value in values if not math.isnan(value))
    if not ordered:
        return {}
    last = len(ordered) - 1
    return {f"p{q}": round(ordered[round(q / 100 * last)], 3) for q in (0, 10, 50, 90, 100)}


async def run_fanout(spec: RunSpec) -> dict[str, Any]:
    """Start a local cloud, run the fan-out ``spec`` describes on it, and measure it.

    :returns: the measurements (RESULTS.md explains each field)
    """
    import cloudpickle

    from covalent_gcpbatch_array.local import LocalCloud

    from .storage_log import StorageLog, logging_every_request

    # The tasks cannot import `benchmarks`: send the electron's function by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    load_at_start = round(os.getloadavg()[0], 2)
    async with contextlib.AsyncExitStack() as stack:
        with logging_every_request():
            cloud = await stack.enter_async_context(
                LocalCloud(
                    provisioning_delay=spec.provisioning_delay,
                    max_running_tasks=spec.max_running_tasks,
                    jobs_per_minute=spec.jobs_per_minute,
                )
            )
        storage_log = StorageLog.of(cloud.workdir)
        fan_out = _FanOut(spec, cloud.executor_config() | spec.executor_settings())
        measured = await fan_out.run()
        stats = await anyio.to_thread.run_sync(cloud.stats)
        storage = storage_log.operations()
    api_calls = {method: int(count) for method, count in stats["api_calls"].items() if count}
    return {
        "kind": "fanout",
        "spec": spec.to_json(),
        "environment": environment() | {"load_average_at_start": load_at_start},
        "electrons": spec.electrons,
        "jobs_created": int(stats["jobs_created"]),
        "vm_boots": int(stats["jobs_created"]),
        "task_attempts": int(stats["task_attempts"]),
        "api_calls": api_calls,
        "api_calls_total": sum(api_calls.values()),
        "storage_ops": storage,
        "storage_ops_total": sum(storage.values()),
        **measured,
    }


class _FanOut:
    """The electrons of one run, on this process's event loop, and what they measure."""

    def __init__(self, spec: RunSpec, settings: dict[str, Any]) -> None:
        self.spec = spec  # what to run
        self.settings = settings  # executor keywords: the cloud's endpoints and the knobs
        self.progress = _Progress(spec.electrons)  # shared with the memory sampler
        self.arrived_at = [math.nan] * spec.electrons  # seconds after the start, by index
        self.finished_at = [math.nan] * spec.electrons  # result or error, by index
        self.failures: dict[int, str] = {}  # index -> what went wrong
        self.dispatch_id = f"bench-{uuid.uuid4().hex[:8]}"
        self.started = 0.0  # monotonic time of the first arrival
        self.first_traceback = ""  # of the first failure's innermost cause, for diagnosis

    async def run(self) -> dict[str, Any]:
        """Run every electron; wait for the executor to finish its clean-up; measure."""
        import covalent  # noqa: F401  (import covalent before the plugin module, as the server does)

        from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor

        spec, progress = self.spec, self.progress
        rss_before = _rss_bytes()
        if spec.trace_memory:
            tracemalloc.start()
        stop_sampling = anyio.Event()
        cpu_start = time.process_time()
        self.started = time.monotonic()
        async with anyio.create_task_group() as sampler:
            sampler.start_soon(_sample_memory, progress, stop_sampling)
            async with anyio.create_task_group() as tg:
                for index in range(spec.electrons):
                    if spec.arrival is Arrival.TRICKLE and index:
                        # The arrival process is what is simulated here, at its own pace.
                        await anyio.sleep_until(self.started + index / spec.rate)
                    tg.start_soon(self._electron, GCPBatchArrayExecutor, index)
            last_result = time.monotonic() - self.started
            cpu_to_last = time.process_time() - cpu_start
            await _wait_executor_idle()
            stop_sampling.set()
        idle_after = time.monotonic() - self.started
        cpu_total = time.process_time() - cpu_start
        traced_peak = tracemalloc.get_traced_memory()[1] if spec.trace_memory else None
        tracemalloc.stop()
        succeeded = [t for i, t in enumerate(self.finished_at) if i not in self.failures]
        return {
            "succeeded": spec.electrons - len(self.failures),
            "failed": len(self.failures),
            "errors_sample": [self.failures[i] for i in sorted(self.failures)[:5]],
            "first_error_traceback": self.first_traceback,
            "arrival_span_s": round(max(self.arrived_at), 3),
            "time_to_first_result_s": round(min(succeeded), 3) if succeeded else None,
            "time_to_last_result_s": round(last_result, 3),
            "completion_quantiles_s": _quantiles(self.finished_at),
            "target_s": round(spec.target_seconds, 3),
            "idle_after_s": round(idle_after, 3),
            "cpu_s_to_last_result": round(cpu_to_last, 3),
            "cpu_s_total": round(cpu_total, 3),
            "cpu_ms_per_electron": round(1000 * cpu_total / spec.electrons, 3),
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

    async def _electron(self, executor_class: Any, index: int) -> None:
        self.arrived_at[index] = time.monotonic() - self.started
        self.progress.arrived += 1
        self.progress.pending += 1
        # A fresh executor per electron, as Covalent makes one.
        executor = executor_class(**self.settings)
        metadata = {"dispatch_id": self.dispatch_id, "node_id": index}
        try:
            value = await executor.run(
                sleepy_electron, [index, self.spec.task_seconds], {}, metadata
            )
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


def environment() -> dict[str, Any]:
    """Where a result was measured: machine, its load, Python, commit, time.

    The commit comes from git, or from ``CGA_BENCH_COMMIT`` when the code runs from an
    exported copy of the repository (as a long suite does, so that edits made meanwhile in
    the working tree cannot change it halfway).
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("CGA_BENCH_COMMIT", "unknown")
    return {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "commit": commit,
    }


def main(argv: list[str] | None = None) -> None:
    """Run one spec (JSON) and write its measurements (JSON) to ``--out`` or stdout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="the RunSpec as JSON")
    parser.add_argument("--out", type=Path, help="where to write the result (default: stdout)")
    options = parser.parse_args(argv)
    spec = RunSpec.from_json(json.loads(options.spec))
    if spec.arrival is Arrival.COVALENT:
        from .covalent_row import run_covalent_fanout

        result = run_covalent_fanout(spec)
    else:
        result = anyio.run(run_fanout, spec)
    text = json.dumps(result, indent=1)
    if options.out is None:
        print(text)
    else:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
