"""Load: many electrons through one executor process, nothing lost, resources bounded.

200 electrons by default (one array job of 200 tasks: about 10 s on 2 idle cores), to keep the suite
short; ``CGA_LOAD_ELECTRONS=10000`` runs the full size (``python -m benchmarks.load --electrons
10000`` prints the whole report). Memory was seen to level off: four rounds of 500 in one
process ended at 146, 149, 152 and 152 MB.
"""

from __future__ import annotations

import math
import os

import pytest

from benchmarks.load import run_load
from covalent_gcpbatch_array._core.runtime import BATCH_API_THREADS
from covalent_gcpbatch_array._core.storage import INPUT_THREADS, OTHER_THREADS
from covalent_gcpbatch_array.local import LocalCloud

ELECTRONS = int(os.environ.get("CGA_LOAD_ELECTRONS", "200"))
MAX_TASKS_PER_JOB = 1000
#: A burst joins its batch at once: a short window and poll period only cut the waiting.
EXECUTOR_OPTIONS = {"max_tasks_per_job": MAX_TASKS_PER_JOB, "batch_window": 0.5, "poll_freq": 0.5}
#: Connections the executor may hold: one per worker thread, plus the odd one being replaced.
CONNECTION_BUDGET = INPUT_THREADS + OTHER_THREADS + BATCH_API_THREADS + 16
#: Memory per electron in flight (its executor, coroutine, batch slot and outcome), generous:
#: about 45 KB was measured.
KB_PER_ELECTRON = 100


@pytest.mark.slow
@pytest.mark.anyio
async def test_many_electrons_through_one_process() -> None:
    async with LocalCloud(max_running_tasks=64) as cloud:
        report = await run_load(cloud, ELECTRONS, executor_options=EXECUTOR_OPTIONS)
    print(
        f"\n{ELECTRONS} electrons: {report.wall_seconds} s, {report.jobs_created} jobs, "
        f"RSS {report.rss_start_mb} -> {report.rss_peak_mb} MB, fds {report.fds_start} -> "
        f"{report.fds_peak}, sockets <= {report.sockets_peak}, calls {report.api_calls}"
    )
    # Nothing lost, nothing run twice.
    assert report.right == ELECTRONS, report.wrong
    assert report.task_attempts == ELECTRONS
    assert report.jobs_created >= math.ceil(ELECTRONS / MAX_TASKS_PER_JOB)
    # Connections and descriptors are bounded by the worker threads, not by the electrons.
    assert report.sockets_peak - report.sockets_start <= CONNECTION_BUDGET
    assert report.fds_peak - report.fds_start <= CONNECTION_BUDGET
    assert report.fds_end - report.fds_start <= CONNECTION_BUDGET
    # Memory grows with the electrons in flight, by a bounded amount each.
    growth_mb = report.rss_peak_mb - report.rss_start_mb
    assert growth_mb <= 50 + ELECTRONS * KB_PER_ELECTRON / 1024
