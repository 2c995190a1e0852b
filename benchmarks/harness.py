"""One fan-out on a fresh local cloud, measured: ``python -m benchmarks.harness --spec JSON``.

The electrons run as in the Covalent server: a fresh executor per electron, every ``run()`` a
task of one event loop. What is measured:

- from the Batch emulator: jobs created, API calls by method (refused ones too), task attempts;
- from fake-gcs-server's request log: storage operations by kind, executor's and tasks' alike;
- in this process, which is the executor's (the emulator, its tasks and fake-gcs-server are
  other processes, so their CPU and memory are not counted): the time from the first arrival
  to the first and to the last result, CPU time (``time.process_time``, all threads) and
  resident memory (sampled from ``/proc/self/statm``; optionally ``tracemalloc``).

The measuring itself is :mod:`benchmarks.measure`'s; for :attr:`Mode.ORIGINAL` it runs in a
process of the original plugin's venv (:mod:`benchmarks.original_plugin`). Every result also
records where it ran: the commit, the machine (cores, load averages before and after) and the
settings the executor was given.

A child process per run keeps these clean: ``ru_maxrss`` and the executor's module-level state
start fresh. :mod:`benchmarks.suite` starts the children.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import json
import os
import platform
import subprocess
import sys
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio

from covalent_gcpbatch_array.config import DEFAULTS

from .measure import FanOut, FanOutLoad, machine_load, sleepy_electron
from .original_plugin.run import cloud_options, run_original_burst
from .original_plugin.venv import ensure_seed_venv

__all__ = ["Arrival", "Mode", "RunSpec", "environment", "run_fanout", "sleepy_electron"]


class Mode(str, enum.Enum):
    """How electrons are packed into Batch jobs."""

    BATCHED = "batched"  # the executor's coalescing (the knobs of the spec)
    BASELINE = "baseline"  # one job per electron: max_tasks_per_job = 1
    ORIGINAL = "original"  # covalent-gcpbatch-plugin 0.15.0 itself: one job per electron


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

    def load(self) -> FanOutLoad:
        """What reaches the executor in a burst or a simulated trickle."""
        rate = self.rate if self.arrival is Arrival.TRICKLE else None
        return FanOutLoad(self.electrons, rate, self.task_seconds, self.trace_memory)

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


async def _wait_executor_idle() -> None:
    """Wait until the executor's batch service of this loop has stopped.

    The service ends once no electron waits and every job monitor has finished (jobs deleted,
    objects cleaned up); that clean-up is executor work, so the CPU count includes it, and the
    cloud must not stop under it.
    """
    from covalent_gcpbatch_array._core.runtime import ExecutorRuntime

    await ExecutorRuntime.wait_idle()


async def run_fanout(spec: RunSpec) -> dict[str, Any]:
    """Start a local cloud, run the fan-out ``spec`` describes on it, and measure it.

    :returns: the measurements (RESULTS.md explains each field)
    """
    import cloudpickle

    from covalent_gcpbatch_array.local import LocalCloud

    from .storage_log import StorageLog, logging_every_request

    # The tasks cannot import `benchmarks`: send the electron's function by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    load_before = machine_load()
    venv = ensure_seed_venv() if spec.mode is Mode.ORIGINAL else None
    async with contextlib.AsyncExitStack() as stack:
        with logging_every_request():
            cloud = await stack.enter_async_context(
                LocalCloud(
                    provisioning_delay=spec.provisioning_delay,
                    max_running_tasks=spec.max_running_tasks,
                    jobs_per_minute=spec.jobs_per_minute,
                    **(cloud_options(venv) if venv else {}),
                )
            )
        storage_log = StorageLog.of(cloud.workdir)
        if venv is None:
            settings = cloud.executor_config() | spec.executor_settings()
            call = _our_electron(settings, spec.task_seconds)
            measured = await FanOut(spec.load(), call, _wait_executor_idle).run()
            measured["executor_settings"] = settings
        else:
            measured = await run_original_burst(
                venv, cloud, dataclasses.asdict(spec.load()), spec.poll_freq
            )
        stats = await anyio.to_thread.run_sync(cloud.stats)
        storage = storage_log.operations()
        objects_left = await anyio.to_thread.run_sync(count_objects, cloud)
    return {
        "kind": "fanout",
        "spec": spec.to_json(),
        "environment": environment(load_before),
        "electrons": spec.electrons,
        **cloud_counts(stats, storage),
        "objects_left": objects_left,
        "target_s": round(spec.target_seconds, 3),
        **measured,
    }


def cloud_counts(stats: Mapping[str, Any], storage: Mapping[str, int]) -> dict[str, Any]:
    """A row's counts from the Batch emulator's ``stats`` and the storage operations of a run:
    jobs, VM boots (one per job), task attempts, API calls by method and storage operations."""
    api_calls = {method: int(count) for method, count in stats["api_calls"].items() if count}
    return {
        "jobs_created": int(stats["jobs_created"]),
        "vm_boots": int(stats["jobs_created"]),
        "task_attempts": int(stats["task_attempts"]),
        "api_calls": api_calls,
        "api_calls_total": sum(api_calls.values()),
        "storage_ops": dict(storage),
        "storage_ops_total": sum(storage.values()),
    }


def count_objects(cloud: Any) -> int:
    """Objects in the cloud's bucket (what the executor left behind, once it is done)."""
    client = cloud.storage_client(direct=True)
    return sum(1 for _ in client.list_blobs(cloud.bucket_name))


def _our_electron(settings: dict[str, Any], task_seconds: float) -> Any:
    """``call(index)`` for :class:`FanOut`: a fresh executor of ours runs electron ``index``,
    then :meth:`FanOut.run` waits for the runtime's clean-up."""
    import covalent  # noqa: F401  (import covalent before the plugin module, as the server does)

    from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor

    dispatch_id = f"bench-{uuid.uuid4().hex[:8]}"

    async def call(index: int) -> Any:
        # A fresh executor per electron, as Covalent makes one.
        executor = GCPBatchArrayExecutor(**settings)
        metadata = {"dispatch_id": dispatch_id, "node_id": index}
        return await executor.run(sleepy_electron, [index, task_seconds], {}, metadata)

    return call


def environment(load_before: list[float] | None = None) -> dict[str, Any]:
    """Where a result was measured: machine, its load, Python, commit, time.

    ``load_average_before`` is ``load_before`` (taken before the run started) and
    ``load_average_after`` the load averages now (1, 5 and 15 minutes), so that a run made on
    a busy machine says so.

    The commit comes from git, or from ``CGA_BENCH_COMMIT`` when the code runs from an
    exported copy of the repository (as a long suite does, so that edits made meanwhile in
    the working tree cannot change it halfway).
    """
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        commit = os.environ.get("CGA_BENCH_COMMIT", "unknown")
    changed = _git("status", "--porcelain", "--", ":/covalent_gcpbatch_array", ":/benchmarks")
    return {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": machine_load(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "commit": commit,
        # Whether the package and benchmarks differ from the commit (None: not a git clone).
        "uncommitted_changes": None if changed is None else bool(changed),
    }


def _git(*args: str) -> str | None:
    """What ``git ARGS`` prints in this clone, or ``None`` outside one."""
    try:
        completed = subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return completed.stdout.strip()


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
