"""REST in worker threads vs the gRPC clients vs plain JSON, per Batch call.

    .venv/bin/python -m benchmarks.batch_transport [--tasks 1000] [--calls 200] [--pollers 16]
        [--json PATH]

One LocalCloud serves one job of ``--tasks`` finished tasks over both transports. For GetJob,
ListTasks (whole tasks) and ListTasks with :data:`TASK_STATE_FIELDS` (the executor's poll), it
measures:

- ``rest``: the executor's own path, :class:`JobsApi` (the sync REST client through
  ``anyio.to_thread``, limited to ``BATCH_API_THREADS`` worker threads);
- ``grpc``: ``BatchServiceAsyncClient`` on a ``grpc.aio`` channel, awaited on the event loop
  (no worker threads of ours), with the same requests and field mask (as metadata);
- ``grpc-sync`` (the poll's listing only): the synchronous ``BatchServiceClient`` on a gRPC
  channel, through the same worker threads as ``rest``;
- ``json`` (the poll's listing only): :meth:`JobsApi.task_states`, what the executor polls with:
  the same GETs over the REST client's session, read with ``json.loads`` into
  ``{index: state}``, no protobuf;

each once sequentially (``--calls`` calls one after the other: latency percentiles) and once
with ``--pollers`` concurrent callers (throughput). Client CPU is this process's CPU time
(every thread: the REST workers, grpc's own) per call; server CPU is the emulator's, read from
``/proc``. Nothing here asserts a limit: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from google.cloud import batch_v1

from covalent_gcpbatch_array._core.jobs import TASK_PAGE_SIZE, TASK_STATE_FIELDS, JobsApi
from covalent_gcpbatch_array._core.runtime import BATCH_API_THREADS
from covalent_gcpbatch_array.local import LocalCloud

Call = Callable[[], Awaitable[Any]]
FINAL = (batch_v1.JobStatus.State.SUCCEEDED, batch_v1.JobStatus.State.FAILED)
_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used, from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def measure(call: Call, calls: int, pollers: int, server_pid: int) -> dict[str, float]:
    """Latency of ``calls`` sequential calls, then throughput of ``pollers`` concurrent ones."""
    for _ in range(5):
        await call()  # warm up: connections, caches
    latencies = []
    cpu, server = time.process_time(), process_cpu(server_pid)
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - start)
    cpu, server = time.process_time() - cpu, process_cpu(server_pid) - server
    latencies.sort()

    async def poller() -> None:
        for _ in range(calls // pollers or 1):
            await call()

    total = pollers * (calls // pollers or 1)
    wall, concurrent_cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for _ in range(pollers):
            tg.start_soon(poller)
    wall, concurrent_cpu = time.perf_counter() - wall, time.process_time() - concurrent_cpu
    return {
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
        "client_cpu_ms_per_call": 1000 * cpu / calls,
        "server_cpu_ms_per_call": 1000 * server / calls,
        "concurrent_calls_per_s": total / wall,
        "concurrent_client_cpu_ms_per_call": 1000 * concurrent_cpu / total,
    }


async def finished(rest: JobsApi, job_id: str) -> None:
    """Wait for the job's tasks, which run in the emulator: polled, as the executor polls."""
    while True:
        if (await rest.get(job_id)).status.state in FINAL:
            return
        await anyio.sleep(0.5)


async def run(tasks: int, calls: int, pollers: int) -> dict[str, dict[str, dict[str, float]]]:
    async with LocalCloud(preload=()) as cloud:
        threads = anyio.CapacityLimiter(BATCH_API_THREADS)
        rest = JobsApi(cloud.batch_client(), cloud.project_id, cloud.region, limiter=threads)
        job_id = f"bench-{uuid.uuid4().hex[:8]}"
        script = batch_v1.Runnable(script={"text": "true"})
        group = batch_v1.TaskGroup(
            task_count=tasks, task_spec=batch_v1.TaskSpec(runnables=[script])
        )
        await rest.create(job_id, batch_v1.Job(task_groups=[group]))
        await finished(rest, job_id)
        name = rest.job_name(job_id)
        mask = [("x-goog-fieldmask", ",".join(TASK_STATE_FIELDS))]
        request = batch_v1.ListTasksRequest(
            parent=f"{name}/taskGroups/group0", page_size=TASK_PAGE_SIZE
        )
        with cloud.batch_grpc_client() as grpc_sync:
            async with cloud.batch_grpc_async_client() as client:

                async def grpc_list(metadata: list[tuple[str, str]]) -> list[batch_v1.Task]:
                    pages = await client.list_tasks(request, metadata=metadata)
                    return [task async for task in pages]

                async def grpc_list_all() -> list[batch_v1.Task]:
                    return await grpc_list([])

                async def grpc_sync_list() -> list[batch_v1.Task]:
                    pages = functools.partial(grpc_sync.list_tasks, request, metadata=mask)
                    return await anyio.to_thread.run_sync(lambda: list(pages()), limiter=threads)

                cases: dict[str, dict[str, Call]] = {
                    "GetJob": {
                        "rest": lambda: rest.get(job_id),
                        "grpc": lambda: client.get_job(name=name),
                    },
                    "ListTasks": {
                        "rest": lambda: rest.list_tasks(job_id),
                        "grpc": grpc_list_all,
                    },
                    "ListTasks(TASK_STATE_FIELDS)": {
                        "rest": lambda: rest.list_tasks(job_id, fields=TASK_STATE_FIELDS),
                        "grpc": lambda: grpc_list(mask),
                        "grpc-sync": grpc_sync_list,
                        "json": lambda: rest.task_states(job_id),
                    },
                }
                listings = [*cases["ListTasks(TASK_STATE_FIELDS)"].values(), grpc_list_all]
                for listing in listings:
                    if (listed := len(await listing())) != tasks:
                        raise AssertionError(f"listed {listed} tasks of {tasks}")
                results: dict[str, dict[str, dict[str, float]]] = {}
                for method, transports in cases.items():
                    results[method] = {}
                    for transport, call in transports.items():
                        results[method][transport] = await measure(
                            call, calls, pollers, cloud.batch_pid
                        )
        return results


def render(results: dict[str, dict[str, dict[str, float]]]) -> str:
    columns = [
        ("p50_ms", "p50 ms"),
        ("p95_ms", "p95 ms"),
        ("client_cpu_ms_per_call", "client CPU ms"),
        ("server_cpu_ms_per_call", "server CPU ms"),
        ("concurrent_calls_per_s", "concurrent calls/s"),
        ("concurrent_client_cpu_ms_per_call", "concurrent client CPU ms"),
    ]
    lines = [
        "| call | transport | " + " | ".join(title for _, title in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for method, transports in results.items():
        for transport, row in transports.items():
            values = " | ".join(f"{row[key]:.2f}" for key, _ in columns)
            lines.append(f"| {method} | {transport} | {values} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--pollers", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    options = parser.parse_args(argv)
    results = anyio.run(run, options.tasks, options.calls, options.pollers)
    print(render(results))
    if options.json is not None:
        options.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
