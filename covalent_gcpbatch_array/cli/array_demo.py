"""``gcpbatch-array local demo``: one Batch array job on the local cloud, via the real clients.

Starts a LocalCloud, plans a spot preemption of one task's first attempt, and creates a script
job of N tasks with ``google-cloud-batch``. Each task writes ``gs://BUCKET/demo/<index>.txt``
with ``google-cloud-storage``, which reaches the local GCS through ``STORAGE_EMULATOR_HOST``
alone, as task code would on a real VM. The demo prints progress from ``GetJob``, reads the
objects back, checks them, and prints what the emulator counted. Exit status 0 means every
check passed.
"""

from __future__ import annotations

import shlex
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from covalent_gcpbatch_array._core.contract import task_index_of
from covalent_gcpbatch_array.local.cloud import LocalCloud

if TYPE_CHECKING:
    from google.cloud import batch_v1

__all__ = ["run_demo"]

OBJECT_PREFIX = "demo"
PREEMPTION_EXIT_CODE = 50001  # Batch's reserved code for a spot VM preemption
_POLL_INTERVAL = 0.1  # seconds between GetJob calls while the job runs
_JOB_TIMEOUT = 300.0  # seconds before the demo gives up on the job

# Runs in every task, with the task's own Python: the client finds the emulator through
# STORAGE_EMULATOR_HOST, which the Batch emulator sets as the VM's environment.
_TASK_CODE = textwrap.dedent(
    """
    import os
    from google.cloud import storage
    index = os.environ["BATCH_TASK_INDEX"]
    text = (f"hello from task {index} of {os.environ['BATCH_TASK_COUNT']}, "
            f"attempt {os.environ['BATCH_TASK_RETRY_ATTEMPT']}")
    bucket = storage.Client().bucket(os.environ["DEMO_BUCKET"])
    bucket.blob(f"{os.environ['DEMO_PREFIX']}/{index}.txt").upload_from_string(text)
    print(text)
    """
)


@dataclass
class _Progress:
    """What the demo last printed about the job, to print only changes."""

    line: str = ""  # the last progress line
    polls: int = 0  # GetJob calls made while waiting


def build_job(task_count: int, bucket_name: str, max_retry_count: int = 2) -> batch_v1.Job:
    """The demo's array job: ``task_count`` tasks, each writing its own object."""
    from google.cloud import batch_v1
    from google.protobuf import duration_pb2

    script = f"{shlex.quote(sys.executable)} -c {shlex.quote(_TASK_CODE)}"
    task_spec = batch_v1.TaskSpec(
        runnables=[batch_v1.Runnable(script=batch_v1.Runnable.Script(text=script))],
        environment=batch_v1.Environment(
            variables={"DEMO_BUCKET": bucket_name, "DEMO_PREFIX": OBJECT_PREFIX}
        ),
        compute_resource=batch_v1.ComputeResource(cpu_milli=1000, memory_mib=512),
        max_retry_count=max_retry_count,
        max_run_duration=duration_pb2.Duration(seconds=120),
    )
    return batch_v1.Job(
        task_groups=[batch_v1.TaskGroup(task_spec=task_spec, task_count=task_count)],
        logs_policy=batch_v1.LogsPolicy(destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING),
        labels={"app": "gcpbatch-array-demo"},
    )


def run_demo(*, tasks: int = 8, provisioning_delay: float = 0.0, out: TextIO = sys.stdout) -> int:
    """Run the demo and print what happens.

    :param tasks: the job's task count (at least 2: one task gets preempted)
    :param provisioning_delay: seconds the emulator waits before a job's first task starts
    :returns: the exit status: 0 if the job succeeded and every object is right, else 1
    """
    if tasks < 2:
        raise ValueError(f"the demo needs at least 2 tasks, got {tasks}")

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    started = time.monotonic()
    say("Starting the local cloud (Batch API emulator + fake-gcs-server) ...")
    # Script tasks start with a plain spawn: no need to pre-import covalent in the fork server.
    with LocalCloud(provisioning_delay=provisioning_delay, preload=()) as cloud:
        say(f"  Batch API     {cloud.batch_endpoint}")
        say(f"  Cloud Storage {cloud.storage_endpoint}  (bucket gs://{cloud.bucket_name})")
        say(f"  ready in {time.monotonic() - started:.1f} s")
        preempted = tasks // 2
        cloud.fail_task(index=preempted, attempt=0, exit_code=PREEMPTION_EXIT_CODE)
        say(
            f"Planned fault: the first attempt of task {preempted} is preempted (exit code "
            f"{PREEMPTION_EXIT_CODE}); the job allows 2 retries."
        )

        client = cloud.batch_client()
        parent = f"projects/{cloud.project_id}/locations/{cloud.region}"
        job_id = f"demo-{uuid.uuid4().hex[:8]}"
        job_started = time.monotonic()
        job = client.create_job(
            parent=parent, job=build_job(tasks, cloud.bucket_name), job_id=job_id
        )
        say(f"Created {job.name} with {tasks} tasks (BATCH_TASK_INDEX 0..{tasks - 1}).")
        job = _wait_for_job(client, job.name, job_started, say)
        job_seconds = time.monotonic() - job_started

        ok = job.status.state.name == "SUCCEEDED"
        if not ok:
            say(f"FAILED: the job ended {job.status.state.name}.")
            for event in job.status.status_events:
                say(f"  {event.description}")
            for task in client.list_tasks(parent=f"{job.name}/taskGroups/group0"):
                if task.status.state.name == "FAILED":
                    index = task_index_of(task.name)
                    say(f"  task {index} stderr: {cloud.task_output(job_id, index, 0, 'stderr')}")
        else:
            ok = _check_objects(cloud, tasks, preempted, say)
            task = client.get_task(name=f"{job.name}/taskGroups/group0/tasks/{preempted}")
            say(f"Status events of task {preempted}:")
            for event in task.status.status_events:
                say(f"  {event.description}")

        stats = cloud.stats()
        calls = ", ".join(
            f"{name} {count}" for name, count in sorted(stats["api_calls"].items()) if count
        )
        say(
            f"Emulator counted: {calls}; jobs created {stats['jobs_created']}, "
            f"task attempts {stats['task_attempts']}."
        )
        say(f"Job time {job_seconds:.1f} s, total {time.monotonic() - started:.1f} s.")
    say("Local cloud stopped.")
    say("Demo OK." if ok else "Demo FAILED.")
    return 0 if ok else 1


def _wait_for_job(
    client: batch_v1.BatchServiceClient,
    name: str,
    job_started: float,
    say: Callable[[str], None],
) -> batch_v1.Job:
    progress = _Progress()
    deadline = job_started + _JOB_TIMEOUT
    while True:
        job = client.get_job(name=name)
        progress.polls += 1
        state = job.status.state.name
        group = job.status.task_groups.get("group0")
        counts = dict(group.counts) if group is not None else {}
        shown = "  ".join(
            f"{key.lower()} {counts[key]}"
            for key in ("PENDING", "ASSIGNED", "RUNNING", "SUCCEEDED", "FAILED")
            if counts.get(key)
        )
        line = f"{state:<9} {shown}"
        if line != progress.line:
            say(f"  [{time.monotonic() - job_started:5.1f} s] {line}")
            progress.line = line
        if state in ("SUCCEEDED", "FAILED"):
            return job
        if time.monotonic() > deadline:
            say(f"  gave up after {_JOB_TIMEOUT:.0f} s and {progress.polls} polls")
            return job
        time.sleep(_POLL_INTERVAL)


def _check_objects(
    cloud: LocalCloud, tasks: int, preempted: int, say: Callable[[str], None]
) -> bool:
    """Read every task's object back with the real client and compare it with what is due."""
    blobs = cloud.storage_client().list_blobs(cloud.bucket_name, prefix=f"{OBJECT_PREFIX}/")
    found = {blob.name: blob.download_as_text() for blob in blobs}
    say(f"Objects in gs://{cloud.bucket_name}/{OBJECT_PREFIX}/:")
    for name in sorted(found, key=lambda n: int(n.rsplit("/", 1)[1].split(".")[0])):
        say(f"  {name}: {found[name]}")
    expected = {
        f"{OBJECT_PREFIX}/{i}.txt": f"hello from task {i} of {tasks}, "
        f"attempt {1 if i == preempted else 0}"
        for i in range(tasks)
    }
    if found == expected:
        return True
    for name in sorted(set(expected) | set(found)):
        if found.get(name) != expected.get(name):
            say(f"  WRONG {name}: expected {expected.get(name)!r}, found {found.get(name)!r}")
    return False
