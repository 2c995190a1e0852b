"""Measure the Batch emulator's speed through the real google-cloud-batch client.

    .venv/bin/python benchmarks/emulator_speed.py [--tasks 1000] [--preload default|none]

Prints, for one emulator process started as LocalCloud starts it:

- start-up: process start -> ready line (includes the fork server's preload);
- first-task latency: CreateJob returning -> the task's first shell statement (bash's
  ``$EPOCHREALTIME``), over 20 one-task jobs with ``provisioning_delay=0``;
- N trivial tasks (each writes a tiny file) of one job: CreateJob -> job SUCCEEDED;
- per-call latency of GetJob and ListTasks (a page of 100) from the real client.

Numbers depend on the machine's load; nothing here asserts a limit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from google.cloud import batch_v1

from covalent_gcpbatch_array._core.clients import make_batch_client

PARENT = "projects/bench/locations/us-east1"
FINAL = {batch_v1.JobStatus.State.SUCCEEDED, batch_v1.JobStatus.State.FAILED}


def start_emulator(workdir: Path, preload: str) -> tuple[subprocess.Popen[bytes], str, float]:
    command = [
        sys.executable,
        "-m",
        "covalent_gcpbatch_array.local.batch.server",
        "--port",
        "0",
        "--storage-endpoint",
        "http://127.0.0.1:9",
        "--workdir",
        str(workdir),
    ]
    if preload == "none":
        command += ["--preload", ""]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise SystemExit("the emulator died at start-up")
    return process, json.loads(line)["endpoint"], time.perf_counter() - started


def script_job(text: str, task_count: int = 1) -> batch_v1.Job:
    runnable = batch_v1.Runnable(script=batch_v1.Runnable.Script(text=text))
    group = batch_v1.TaskGroup(
        task_count=task_count, task_spec=batch_v1.TaskSpec(runnables=[runnable])
    )
    return batch_v1.Job(task_groups=[group])


def wait_done(client: batch_v1.BatchServiceClient, name: str) -> batch_v1.Job:
    while True:
        job = client.get_job(name=name)
        if job.status.state in FINAL:
            return job
        time.sleep(0.01)


def timed(call: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def summary(seconds: list[float]) -> str:
    ms = sorted(1000 * s for s in seconds)
    p90 = ms[int(0.9 * (len(ms) - 1))]
    return f"median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms, max {ms[-1]:.1f} ms (n={len(ms)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--preload", choices=["default", "none"], default="default")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        process, endpoint, startup = start_emulator(folder / "emulator", options.preload)
        try:
            print(f"start-up (preload {options.preload}): {startup:.2f} s")
            client = make_batch_client(endpoint)

            latencies = []
            for i in range(20):
                stamp = folder / f"stamp{i}"
                job = script_job(f'echo "$EPOCHREALTIME" > "{stamp}"')
                created = client.create_job(parent=PARENT, job=job, job_id=f"first-{i}")
                returned = time.time()
                wait_done(client, created.name)
                latencies.append(float(stamp.read_text()) - returned)
            print(f"first task start after CreateJob returned: {summary(latencies)}")

            out = folder / "many"
            out.mkdir()
            job = script_job(f': > "{out}/$BATCH_TASK_INDEX"', task_count=options.tasks)
            started = time.perf_counter()
            created = client.create_job(
                parent=PARENT, job=job, job_id=f"many-{uuid.uuid4().hex[:6]}"
            )
            done = wait_done(client, created.name)
            elapsed = time.perf_counter() - started
            files = len(list(out.iterdir()))
            state = done.status.state.name
            print(f"{options.tasks} trivial tasks: {elapsed:.2f} s to {state} ({files} files)")

            print(f"GetJob: {summary(timed(lambda: client.get_job(name=done.name), 200))}")
            request = {"parent": done.name + "/taskGroups/group0", "page_size": 100}
            page = lambda: next(iter(client.list_tasks(request=request).pages))  # noqa: E731
            print(f"ListTasks (page of 100): {summary(timed(page, 100))}")
        finally:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
