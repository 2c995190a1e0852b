"""The Batch API emulator, driven through the real google-cloud-batch REST client.

One emulator process serves the module (started exactly as LocalCloud starts it: a subprocess
that prints one JSON line); tests use unique job ids and put back any setting they change.
Task scripts write into a temporary folder instead of GCS (test_local_cloud covers GCS).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry, if_exception_type
from google.cloud import batch_v1
from google.protobuf import duration_pb2

from covalent_gcpbatch_array._core.clients import make_batch_client
from tests.polling import job_reached, wait_until

PARENT = "projects/test-project/locations/us-east1"
STORAGE_ENDPOINT = "http://127.0.0.1:9"  # never contacted: no test script uses GCS
IMAGE_MAP = {"test/shell:*": ["bash", "-c"]}
JobState = batch_v1.JobStatus.State
TaskState = batch_v1.TaskStatus.State


# -- helpers -------------------------------------------------------------------------------


@dataclass
class Emulator:
    """A running emulator process."""

    endpoint: str
    process: subprocess.Popen[bytes]
    stderr_path: Path

    def client(self) -> batch_v1.BatchServiceClient:
        return make_batch_client(self.endpoint)

    def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One plain HTTP call; returns (status, parsed JSON or text)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(
            self.endpoint + path, data=data, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload.decode()

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self.http(method, "/_emulator/" + path, body)
        assert status == 200, payload
        return payload


@contextlib.contextmanager
def run_emulator(
    workdir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[Emulator]:
    """Start the server process as LocalCloud does, and stop it (SIGTERM, then SIGKILL)."""
    workdir.mkdir(parents=True, exist_ok=True)
    stderr_path = workdir / "server.stderr"
    command = [
        sys.executable,
        "-m",
        "covalent_gcpbatch_array.local.batch.server",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--storage-endpoint",
        STORAGE_ENDPOINT,
        "--workdir",
        str(workdir / "emulator"),
        "--image-map",
        json.dumps(IMAGE_MAP),
        "--preload",
        "",
        *args,
    ]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, env=env or dict(os.environ)
        )
    # The ready line must come; if the process hangs instead, kill it so readline returns.
    watchdog = threading.Timer(60, process.kill)
    watchdog.start()
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        watchdog.cancel()
        if not line:
            raise AssertionError(f"emulator died at start:\n{stderr_path.read_text()}")
        ready = json.loads(line)
        assert ready["pid"] == process.pid
        yield Emulator(ready["endpoint"], process, stderr_path)
    finally:
        watchdog.cancel()
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def script_job(
    *scripts: str,
    task_count: int = 1,
    env: dict[str, str] | None = None,
    max_retry_count: int = 0,
    parallelism: int = 0,
    max_run_duration: float | None = None,
    lifecycle: batch_v1.LifecyclePolicy | None = None,
) -> batch_v1.Job:
    spec = batch_v1.TaskSpec(
        runnables=[batch_v1.Runnable(script=batch_v1.Runnable.Script(text=s)) for s in scripts],
        environment=batch_v1.Environment(variables=env or {}),
        max_retry_count=max_retry_count,
    )
    if max_run_duration is not None:
        spec.max_run_duration = duration_pb2.Duration(
            seconds=int(max_run_duration), nanos=int(max_run_duration % 1 * 1e9)
        )
    if lifecycle is not None:
        spec.lifecycle_policies = [lifecycle]
    group = batch_v1.TaskGroup(task_count=task_count, parallelism=parallelism, task_spec=spec)
    return batch_v1.Job(task_groups=[group])


def create(client: batch_v1.BatchServiceClient, job: batch_v1.Job, prefix: str) -> batch_v1.Job:
    return client.create_job(parent=PARENT, job=job, job_id=new_id(prefix))


def tasks_of(client: batch_v1.BatchServiceClient, job: batch_v1.Job, **kwargs: Any) -> list[Any]:
    return list(client.list_tasks(request={"parent": job.name + "/taskGroups/group0", **kwargs}))


def exit_codes(task: batch_v1.Task) -> list[int]:
    """The exit codes of a task's ended attempts, oldest first."""
    state = batch_v1.TaskStatus.State
    return [
        event.task_execution.exit_code
        for event in task.status.status_events
        if event.task_state in (state.FAILED, state.SUCCEEDED)
    ]


def max_overlap(folder: Path, count: int) -> int:
    """Most intervals [start_i, end_i] (written by tasks) open at one moment."""
    edges = []
    for i in range(count):
        edges.append((float((folder / f"start{i}").read_text()), 1))
        edges.append((float((folder / f"end{i}").read_text()), -1))
    running = peak = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):
        running += step
        peak = max(peak, running)
    return peak


def process_dead(pid: int) -> bool:
    """The process is gone or a zombie (dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


TIMED = 'date +%s.%N > "$DIR/start$BATCH_TASK_INDEX"; sleep 0.3; date +%s.%N > "$DIR/end$BATCH_TASK_INDEX"'


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    env = dict(os.environ, LEAKY_PARENT_VARIABLE="must-not-reach-tasks")
    with run_emulator(tmp_path_factory.mktemp("emulator"), env=env) as server:
        yield server


@pytest.fixture
def client(emulator: Emulator) -> Iterator[batch_v1.BatchServiceClient]:
    yield emulator.client()
    # Put back every knob a test may have turned.
    emulator.admin(
        "POST",
        "settings",
        {"provisioning_delay": 0, "max_running_tasks": None, "jobs_per_minute": None},
    )


# -- tests ---------------------------------------------------------------------------------


class TestJobLifecycle:
    def test_five_tasks_each_write_a_file_named_by_their_index(
        self, client: batch_v1.BatchServiceClient, tmp_path: Path
    ) -> None:
        script = 'echo "$BATCH_TASK_INDEX/$BATCH_TASK_COUNT/$BATCH_TASK_RETRY_ATTEMPT/$BATCH_JOB_ID" > "$DIR/$BATCH_TASK_INDEX"'
        job = script_job(script, task_count=5, env={"DIR": str(tmp_path)})
        job.labels = {"team": "science"}
        job.allocation_policy = batch_v1.AllocationPolicy(
            instances=[
                batch_v1.AllocationPolicy.InstancePolicyOrTemplate(
                    policy=batch_v1.AllocationPolicy.InstancePolicy(machine_type="e2-standard-4")
                )
            ]
        )
        job.logs_policy = batch_v1.LogsPolicy(
            destination=batch_v1.LogsPolicy.Destination.CLOUD_LOGGING
        )
        job.task_groups[0].task_spec.compute_resource = batch_v1.ComputeResource(cpu_milli=2000)
        job_id = new_id("five")

        created = client.create_job(parent=PARENT, job=job, job_id=job_id)
        assert created.name == f"{PARENT}/jobs/{job_id}"
        assert created.status.state == JobState.QUEUED
        done = job_reached(client, created.name)

        assert done.status.state == JobState.SUCCEEDED
        assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2", "3", "4"]
        for index in range(5):
            assert (tmp_path / str(index)).read_text() == f"{index}/5/0/{job_id}\n"
        assert dict(done.status.task_groups["group0"].counts) == {"SUCCEEDED": 5}
        assert [event.description for event in done.status.status_events] == [
            f"Job state is set from {a} to {b} for job {created.name}."
            for a, b in [
                ("QUEUED", "SCHEDULED"),
                ("SCHEDULED", "RUNNING"),
                ("RUNNING", "SUCCEEDED"),
            ]
        ]
        assert done.status.run_duration.total_seconds() > 0
        assert done.uid == created.uid and done.uid
        assert done.update_time >= done.create_time
        # What the emulator does not act on is echoed, and Google's defaults are filled in.
        assert done.labels == {"team": "science", "batch-job-id": job_id}  # Batch adds its own
        assert done.allocation_policy.instances[0].policy.machine_type == "e2-standard-4"
        assert done.logs_policy.destination == batch_v1.LogsPolicy.Destination.CLOUD_LOGGING
        assert done.task_groups[0].task_spec.compute_resource.cpu_milli == 2000
        assert done.task_groups[0].parallelism == 5
        assert done.task_groups[0].name == f"{created.name}/taskGroups/group0"

        task = client.get_task(name=f"{created.name}/taskGroups/group0/tasks/2")
        assert task.status.state == TaskState.SUCCEEDED
        assert [event.task_state for event in task.status.status_events] == [
            TaskState.ASSIGNED,
            TaskState.RUNNING,
            TaskState.SUCCEEDED,
        ]
        assert task.status.status_events[-1].description.startswith(
            "Task state is updated from RUNNING to SUCCEEDED on zones/us-east1-b/instances/"
        )

    def test_environment_is_the_vm_s_and_the_job_s_only(
        self, client: batch_v1.BatchServiceClient, emulator: Emulator, tmp_path: Path
    ) -> None:
        job = script_job(
            'env > "$DIR/env"; test -d "$HOME"',
            env={"DIR": str(tmp_path), "A": "spec", "B": "spec"},
        )
        runnable = job.task_groups[0].task_spec.runnables[0]
        runnable.environment = batch_v1.Environment(
            variables={"B": "runnable", "BATCH_TASK_INDEX": "99"}
        )
        done = job_reached(client, create(client, job, "env").name)

        assert done.status.state == JobState.SUCCEEDED
        env = dict(
            line.split("=", 1)
            for line in (tmp_path / "env").read_text().splitlines()
            if "=" in line
        )
        assert env["A"] == "spec" and env["B"] == "runnable"
        assert env["BATCH_TASK_INDEX"] == "0"  # Batch's own variables cannot be overridden
        assert env["BATCH_JOB_UID"] == done.uid
        assert env["STORAGE_EMULATOR_HOST"] == STORAGE_ENDPOINT
        assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
        assert "LEAKY_PARENT_VARIABLE" not in env

    def test_runnables_run_in_order_with_google_s_exit_status_rules(
        self, client: batch_v1.BatchServiceClient, emulator: Emulator, tmp_path: Path
    ) -> None:
        log = f'>> "{tmp_path}/log"'
        job = script_job(
            f"echo first {log}; exit 7",
            f"echo second {log}; echo to-stdout; echo to-stderr >&2",
            f"echo third {log}; exit 3",
            f"echo skipped {log}",
            f"echo always {log}",
        )
        runnables = job.task_groups[0].task_spec.runnables
        runnables[0].ignore_exit_status = True
        runnables[4].always_run = True
        done = job_reached(client, create(client, job, "order").name)

        assert done.status.state == JobState.FAILED
        assert (tmp_path / "log").read_text() == "first\nsecond\nthird\nalways\n"
        [task] = tasks_of(client, done)
        assert exit_codes(task) == [3]
        job_id = done.name.rsplit("/", 1)[1]
        status, stdout = emulator.http("GET", f"/_emulator/tasks/{job_id}/0/0/stdout")
        assert (status, stdout) == (200, "to-stdout\n")
        assert emulator.http("GET", f"/_emulator/tasks/{job_id}/0/0/stderr")[1] == "to-stderr\n"
        assert emulator.http("GET", f"/_emulator/tasks/{job_id}/0/1/stdout")[0] == 404

    def test_container_runnable_runs_through_the_image_map(
        self, client: batch_v1.BatchServiceClient, tmp_path: Path
    ) -> None:
        job = script_job("true")
        job.task_groups[0].task_spec.runnables = [
            batch_v1.Runnable(
                container=batch_v1.Runnable.Container(
                    image_uri="test/shell:latest",
                    commands=[f'echo "container $BATCH_TASK_INDEX" > "{tmp_path}/out"'],
                )
            )
        ]
        done = job_reached(client, create(client, job, "container").name)

        assert done.status.state == JobState.SUCCEEDED
        assert (tmp_path / "out").read_text() == "container 0\n"
        assert done.task_groups[0].task_spec.runnables[0].container.image_uri == "test/shell:latest"


class TestRetries:
    def test_a_failing_attempt_is_retried_with_the_next_attempt_number(
        self, client: batch_v1.BatchServiceClient, emulator: Emulator, tmp_path: Path
    ) -> None:
        before = emulator.admin("GET", "stats")["task_attempts"]
        script = f'echo "$BATCH_TASK_RETRY_ATTEMPT" >> "{tmp_path}/attempts"; [ "$BATCH_TASK_RETRY_ATTEMPT" -ge 2 ] || exit 4'
        done = job_reached(
            client, create(client, script_job(script, max_retry_count=3), "retry").name
        )

        assert done.status.state == JobState.SUCCEEDED
        assert (tmp_path / "attempts").read_text() == "0\n1\n2\n"
        [task] = tasks_of(client, done)
        assert exit_codes(task) == [4, 4, 0]
        assert "with exit code 4." in task.status.status_events[2].description
        assert emulator.admin("GET", "stats")["task_attempts"] - before == 3

    def test_retries_run_out_and_the_job_fails_naming_the_task(
        self, client: batch_v1.BatchServiceClient
    ) -> None:
        job = script_job('[ "$BATCH_TASK_INDEX" = 0 ] || exit 5', task_count=2, max_retry_count=2)
        done = job_reached(client, create(client, job, "exhaust").name)

        assert done.status.state == JobState.FAILED
        assert dict(done.status.task_groups["group0"].counts) == {"SUCCEEDED": 1, "FAILED": 1}
        last = done.status.status_events[-1].description
        assert "Job failed due to task failure. Specifically, task with index 1 failed" in last
        assert "with exit code 5." in last
        assert exit_codes(tasks_of(client, done)[1]) == [5, 5, 5]

    @pytest.mark.parametrize(
        ("action", "attempts_of_code_3", "attempts_of_code_4"),
        [
            (batch_v1.LifecyclePolicy.Action.FAIL_TASK, 1, 3),
            (batch_v1.LifecyclePolicy.Action.RETRY_TASK, 3, 1),
        ],
    )
    def test_lifecycle_policy_decides_which_exit_codes_are_retried(
        self,
        client: batch_v1.BatchServiceClient,
        action: batch_v1.LifecyclePolicy.Action,
        attempts_of_code_3: int,
        attempts_of_code_4: int,
    ) -> None:
        policy = batch_v1.LifecyclePolicy(
            action=action,
            action_condition=batch_v1.LifecyclePolicy.ActionCondition(exit_codes=[3]),
        )
        job = script_job(
            "exit $((BATCH_TASK_INDEX + 3))", task_count=2, max_retry_count=2, lifecycle=policy
        )
        done = job_reached(client, create(client, job, "lifecycle").name)

        assert done.status.state == JobState.FAILED
        task_3, task_4 = tasks_of(client, done)
        assert exit_codes(task_3) == [3] * attempts_of_code_3
        assert exit_codes(task_4) == [4] * attempts_of_code_4


class TestTimeLimits:
    def test_max_run_duration_kills_the_task_with_exit_code_50005(
        self, client: batch_v1.BatchServiceClient, tmp_path: Path
    ) -> None:
        job = script_job(f'echo $$ > "{tmp_path}/pid"; exec sleep 60', max_run_duration=0.5)
        done = job_reached(client, create(client, job, "timeout").name)

        assert done.status.state == JobState.FAILED
        [task] = tasks_of(client, done)
        assert exit_codes(task) == [50005]
        assert task.status.status_events[-1].description.endswith(
            "due to task runs over the maximum runtime with exit code 50005."
        )
        pid = int((tmp_path / "pid").read_text())
        wait_until(lambda: process_dead(pid), timeout=10, what=f"task process {pid} to die")

    def test_a_runnable_timeout_also_gives_50005(self, client: batch_v1.BatchServiceClient) -> None:
        job = script_job("sleep 60")
        job.task_groups[0].task_spec.runnables[0].timeout = duration_pb2.Duration(nanos=300_000_000)
        done = job_reached(client, create(client, job, "runnable-timeout").name)

        assert exit_codes(tasks_of(client, done)[0]) == [50005]


class TestScheduling:
    def test_parallelism_caps_a_job_s_running_tasks(
        self, client: batch_v1.BatchServiceClient, tmp_path: Path
    ) -> None:
        job = script_job(TIMED, task_count=6, parallelism=2, env={"DIR": str(tmp_path)})
        done = job_reached(client, create(client, job, "parallel").name)

        assert done.status.state == JobState.SUCCEEDED
        assert done.task_groups[0].parallelism == 2
        assert 1 <= max_overlap(tmp_path, 6) <= 2

    def test_max_running_tasks_caps_all_jobs_together(
        self, client: batch_v1.BatchServiceClient, emulator: Emulator, tmp_path: Path
    ) -> None:
        emulator.admin("POST", "settings", {"max_running_tasks": 2})
        names = []
        for job_number in range(2):
            folder = tmp_path / str(job_number)
            folder.mkdir()
            names.append(
                create(
                    client, script_job(TIMED, task_count=3, env={"DIR": str(folder)}), "cap"
                ).name
            )
        for name in names:
            assert job_reached(client, name).status.state == JobState.SUCCEEDED

        # Put both jobs' intervals in one folder's numbering to measure them together.
        merged = tmp_path / "merged"
        merged.mkdir()
        for job_number in range(2):
            for i in range(3):
                for edge in ("start", "end"):
                    text = (tmp_path / str(job_number) / f"{edge}{i}").read_text()
                    (merged / f"{edge}{job_number * 3 + i}").write_text(text)
        assert 1 <= max_overlap(merged, 6) <= 2
        assert emulator.admin("GET", "settings")["max_running_tasks"] == 2

    def test_provisioning_delay_keeps_the_job_scheduled_before_any_task_starts(
        self, client: batch_v1.BatchServiceClient, emulator: Emulator
    ) -> None:
        emulator.admin("POST", "settings", {"provisioning_delay": 0.6})
        created = create(client, script_job("true", task_count=2), "provision")

        scheduled = job_reached(
            client, created.name, {state.name for state in JobState} - {"QUEUED"}
        )
        assert scheduled.status.state == JobState.SCHEDULED
        assert dict(scheduled.status.task_groups["group0"].counts) == {"PENDING": 2}
        done = job_reached(client, created.name)

        assert done.status.state == JobState.SUCCEEDED
        scheduled_at = done.status.status_events[0].event_time
        assert "QUEUED to SCHEDULED" in done.status.status_events[0].description
        first_assigned = min(
            task.status.status_events[0].event_time for task in tasks_of(client, done)
        )
        assert (first_assigned - scheduled_at).total_seconds() >= 0.5


class TestDelete:
    def test_delete_kills_running_tasks_and_the_job_is_gone(
        self, client: batch_v1.BatchServiceClient, tmp_path: Path
    ) -> None:
        script = f'echo $$ > "{tmp_path}/pid$BATCH_TASK_INDEX"; exec sleep 60'
        created = create(client, script_job(script, task_count=4, parallelism=2), "delete")
        wait_until(
            lambda: (
                len(list(tmp_path.glob("pid*"))) == 2
                and len(tasks_of(client, created, filter="State=RUNNING")) == 2
            ),
            what="two tasks running",
        )
        pids = [int(path.read_text()) for path in tmp_path.glob("pid*")]

        operation = client.delete_job(name=created.name)
        operation.result(timeout=30)

        assert operation.done()
        for pid in pids:
            assert process_dead(pid), f"task process {pid} survived the job's deletion"
        with pytest.raises(api_exceptions.NotFound, match=created.name):
            client.get_job(name=created.name)
        assert len(list(tmp_path.glob("pid*"))) == 2  # the pending tasks never ran

    def test_deleting_an_unknown_job_is_404(self, client: batch_v1.BatchServiceClient) -> None:
        with pytest.raises(api_exceptions.NotFound, match="no-such-job"):
            client.delete_job(name=f"{PARENT}/jobs/no-such-job")

    def test_a_job_id_can_be_reused_after_deletion(
        self, client: batch_v1.BatchServiceClient
    ) -> None:
        job_id = new_id("reuse")
        first = client.create_job(parent=PARENT, job=script_job("true"), job_id=job_id)
        job_reached(client, first.name)
        client.delete_job(name=first.name).result(timeout=30)
        second = client.create_job(parent=PARENT, job=script_job("true"), job_id=job_id)

        assert second.name == first.name and second.uid != first.uid
        assert job_reached(client, second.name).status.state == JobState.SUCCEEDED


class TestListing:
    def test_list_tasks_filters_by_state(
        self, client: batch_v1.BatchServiceClient, tmp_path: Path
    ) -> None:
        script = f'[ "$BATCH_TASK_INDEX" -ge 2 ] && exit 0; while [ ! -e "{tmp_path}/release" ]; do sleep 0.02; done'
        created = create(client, script_job(script, task_count=4), "filter")

        def indices(state_filter: str) -> list[int]:
            tasks = tasks_of(client, created, filter=state_filter)
            return [int(task.name.rsplit("/", 1)[1]) for task in tasks]

        wait_until(lambda: indices("State=SUCCEEDED") == [2, 3], what="tasks 2 and 3 to succeed")
        assert indices("State=RUNNING") == [0, 1]
        assert indices("State=RUNNING OR State=SUCCEEDED") == [0, 1, 2, 3]
        assert indices("State=FAILED") == []
        (tmp_path / "release").touch()
        job_reached(client, created.name)
        assert indices("State=SUCCEEDED") == [0, 1, 2, 3]

        with pytest.raises(api_exceptions.BadRequest, match="filter"):
            tasks_of(client, created, filter="State=NOPE")
        with pytest.raises(api_exceptions.BadRequest, match="filter"):
            tasks_of(client, created, filter="labels.team=science")

    def test_list_tasks_pages(self, client: batch_v1.BatchServiceClient) -> None:
        done = job_reached(client, create(client, script_job("true", task_count=250), "pages").name)

        pager = client.list_tasks(
            request={"parent": done.name + "/taskGroups/group0", "page_size": 100}
        )
        pages = [[task.name.rsplit("/", 1)[1] for task in page.tasks] for page in pager.pages]
        assert [len(page) for page in pages] == [100, 100, 50]
        assert [int(i) for page in pages for i in page] == list(range(250))
        # Without page_size the default page is 100 tasks.
        first_page = next(iter(client.list_tasks(parent=done.name + "/taskGroups/group0").pages))
        assert len(first_page.tasks) == 100 and first_page.next_page_token

    def test_list_jobs_pages_in_creation_order(self, client: batch_v1.BatchServiceClient) -> None:
        parent = f"projects/list-{uuid.uuid4().hex[:6]}/locations/europe-west4"
        names = [
            client.create_job(parent=parent, job=script_job("true"), job_id=f"job-{i}").name
            for i in range(3)
        ]
        pager = client.list_jobs(request={"parent": parent, "page_size": 2})
        pages = [[job.name for job in page.jobs] for page in pager.pages]
        assert pages == [names[:2], names[2:]]
        for name in names:
            job_reached(client, name)
        listed = client.list_jobs(request={"parent": parent, "filter": 'status.state="SUCCEEDED"'})
        assert [job.name for job in listed] == names

    def test_unknown_job_task_or_group_is_404(self, client: batch_v1.BatchServiceClient) -> None:
        missing = f"{PARENT}/jobs/never-created"
        with pytest.raises(api_exceptions.NotFound, match="never-created"):
            client.get_job(name=missing)
        with pytest.raises(api_exceptions.NotFound, match="never-created"):
            client.list_tasks(parent=missing + "/taskGroups/group0")
        done = job_reached(client, create(client, script_job("true"), "known").name)
        with pytest.raises(api_exceptions.NotFound, match="tasks/7"):
            client.get_task(name=done.name + "/taskGroups/group0/tasks/7")
        with pytest.raises(api_exceptions.NotFound, match="group1"):
            client.list_tasks(parent=done.name + "/taskGroups/group1")


STATE_MASK = "tasks.name,tasks.status.state,nextPageToken"


@pytest.fixture(scope="module")
def finished(emulator: Emulator) -> batch_v1.Job:
    """A finished job of 250 tasks; task 1 failed."""
    client = emulator.client()
    job = script_job('[ "$BATCH_TASK_INDEX" = 1 ] && exit 7; exit 0', task_count=250)
    return job_reached(client, create(client, job, "masked").name)


class TestFieldMasks:
    """The ``$fields`` system parameter, as a query parameter or the ``X-Goog-FieldMask`` header."""

    @pytest.mark.parametrize(
        ("query", "headers"),
        [
            ("?$fields=" + STATE_MASK, {}),
            ("?fields=tasks(name,status.state),nextPageToken", {}),
            ("", {"X-Goog-FieldMask": STATE_MASK}),
        ],
    )
    def test_list_tasks_answers_only_the_masked_fields(
        self, emulator: Emulator, finished: batch_v1.Job, query: str, headers: dict[str, str]
    ) -> None:
        path = f"/v1/{finished.name}/taskGroups/group0/tasks{query}"
        status, whole = emulator.http("GET", path.split("?")[0])
        assert status == 200
        status, body = emulator.http("GET", path, headers=headers)
        assert status == 200, body
        assert set(body) == {"tasks", "nextPageToken"}
        assert body["tasks"] == [
            {"name": task["name"], "status": {"state": task["status"]["state"]}}
            for task in whole["tasks"]
        ]
        assert all(task["status"]["statusEvents"] for task in whole["tasks"])

    def test_the_real_client_pages_through_masked_tasks(
        self, client: batch_v1.BatchServiceClient, finished: batch_v1.Job
    ) -> None:
        pager = client.list_tasks(
            request={"parent": finished.name + "/taskGroups/group0", "page_size": 100},
            metadata=[("x-goog-fieldmask", STATE_MASK)],
        )
        pages = [list(page.tasks) for page in pager.pages]
        assert [len(page) for page in pages] == [100, 100, 50]
        tasks = [task for page in pages for task in page]
        assert [int(task.name.rsplit("/", 1)[1]) for task in tasks] == list(range(250))
        states = [task.status.state for task in tasks]
        assert states == [TaskState.FAILED if i == 1 else TaskState.SUCCEEDED for i in range(250)]
        assert not any(task.status.status_events for task in tasks)

    def test_get_job_masks_into_the_task_group_map(
        self, emulator: Emulator, finished: batch_v1.Job
    ) -> None:
        mask = "status(state,taskGroups.group0.counts)"
        status, body = emulator.http("GET", f"/v1/{finished.name}?$fields={mask}")
        assert status == 200, body
        assert body == {
            "status": {
                "state": "FAILED",
                "taskGroups": {"group0": {"counts": {"SUCCEEDED": "249", "FAILED": "1"}}},
            }
        }

    def test_an_unknown_field_is_400_naming_it(
        self, client: batch_v1.BatchServiceClient, finished: batch_v1.Job
    ) -> None:
        with pytest.raises(api_exceptions.BadRequest, match=r"tasks\.status\.sate"):
            client.list_tasks(
                parent=finished.name + "/taskGroups/group0",
                metadata=[("x-goog-fieldmask", "tasks.name,tasks.status.sate")],
            )

    def test_a_create_with_a_bad_mask_makes_no_job(
        self, emulator: Emulator, client: batch_v1.BatchServiceClient
    ) -> None:
        job_id = new_id("badmask")
        with pytest.raises(api_exceptions.BadRequest, match="nmae"):
            client.create_job(
                parent=PARENT,
                job=script_job("true"),
                job_id=job_id,
                metadata=[("x-goog-fieldmask", "nmae")],
            )
        with pytest.raises(api_exceptions.NotFound):
            client.get_job(name=f"{PARENT}/jobs/{job_id}")


class TestValidation:
    @pytest.mark.parametrize(
        "job_id", ["Upper", "1starts-with-digit", "ends-with-", "x" * 64, "under_score"]
    )
    def test_bad_job_id_is_400_naming_the_field(
        self, client: batch_v1.BatchServiceClient, job_id: str
    ) -> None:
        with pytest.raises(api_exceptions.BadRequest, match="job_id") as caught:
            client.create_job(parent=PARENT, job=script_job("true"), job_id=job_id)
        assert caught.value.details[0]["fieldViolations"][0]["field"] == "job_id"

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            (lambda job: setattr(job.task_groups[0], "task_count", 100_001), "task_count"),
            (lambda job: setattr(job.task_groups[0], "task_count", -1), "task_count"),
            (
                lambda job: setattr(job.task_groups[0].task_spec, "max_retry_count", 11),
                "max_retry_count",
            ),
            (lambda job: setattr(job.task_groups[0], "parallelism", -2), "parallelism"),
            (lambda job: job.task_groups[0].task_spec.runnables.pop(), "runnables"),
            (lambda job: job.task_groups.pop(), "task_groups"),
        ],
    )
    def test_bad_job_definition_is_400_naming_the_field(
        self,
        client: batch_v1.BatchServiceClient,
        change: Callable[[batch_v1.Job], object],
        field: str,
    ) -> None:
        job = script_job("true")
        change(job)
        with pytest.raises(api_exceptions.BadRequest, match=field):
            client.create_job(parent=PARENT, job=job, job_id=new_id("bad"))

    def test_unmapped_container_image_is_400_saying_how_to_map_it(
        self, client: batch_v1.BatchServiceClient
    ) -> None:
        job = script_job("true")
        job.task_groups[0].task_spec.runnables = [
            batch_v1.Runnable(container=batch_v1.Runnable.Container(image_uri="elsewhere/image:1"))
        ]
        with pytest.raises(api_exceptions.BadRequest, match="elsewhere/image:1"):
            client.create_job(parent=PARENT, job=job, job_id=new_id("image"))

    def test_duplicate_job_id_is_409(self, client: batch_v1.BatchServiceClient) -> None:
        job_id = new_id("dup")
        client.create_job(parent=PARENT, job=script_job("true"), job_id=job_id)
        with pytest.raises(api_exceptions.Conflict, match="already exists"):
            client.create_job(parent=PARENT, job=script_job("true"), job_id=job_id)

    def test_request_id_makes_a_repeated_create_idempotent(
        self, client: batch_v1.BatchServiceClient, emulator: Emulator
    ) -> None:
        job_id, request_id = new_id("idem"), str(uuid.uuid4())

        def create_once(script: str) -> batch_v1.Job:
            request = batch_v1.CreateJobRequest(
                parent=PARENT, job=script_job(script), job_id=job_id, request_id=request_id
            )
            return client.create_job(request=request)

        first = create_once("true")
        created_before = emulator.admin("GET", "stats")["jobs_created"]
        again = create_once("true")
        assert (again.name, again.uid) == (first.name, first.uid)
        assert emulator.admin("GET", "stats")["jobs_created"] == created_before
        with pytest.raises(api_exceptions.Conflict, match=request_id):
            create_once("false")
        with pytest.raises(api_exceptions.BadRequest, match="request_id"):
            client.create_job(
                request=batch_v1.CreateJobRequest(
                    parent=PARENT,
                    job=script_job("true"),
                    job_id=new_id("idem"),
                    request_id="not-a-uuid",
                )
            )

    def test_over_the_creation_quota_is_429(
        self, client: batch_v1.BatchServiceClient, emulator: Emulator
    ) -> None:
        emulator.admin("POST", "settings", {"jobs_per_minute": 1})
        outcomes = []
        for _ in range(3):
            try:
                create(client, script_job("true"), "quota")
                outcomes.append("created")
            except api_exceptions.TooManyRequests as exc:
                assert "jobs per minute" in exc.message and "quota" in exc.message.lower()
                outcomes.append("refused")
        # The 60 s window may already hold jobs of other tests: at most one more fits.
        assert outcomes.count("created") <= 1 and outcomes[-1] == "refused"
        emulator.admin("POST", "settings", {"jobs_per_minute": None})
        create(client, script_job("true"), "quota")


class TestFaults:
    def test_fail_calls_answers_the_next_calls_with_google_errors(
        self, client: batch_v1.BatchServiceClient, emulator: Emulator
    ) -> None:
        calls_before = emulator.admin("GET", "stats")["api_calls"].get("CreateJob", 0)
        emulator.admin("POST", "fail_calls", {"method": "CreateJob", "status": 503, "count": 2})
        for _ in range(2):
            with pytest.raises(api_exceptions.ServiceUnavailable, match="Injected fault"):
                create(client, script_job("true"), "flaky")
        created = create(client, script_job("true"), "flaky")
        assert emulator.admin("GET", "stats")["api_calls"]["CreateJob"] == calls_before + 3

        for status, error in [
            (429, api_exceptions.TooManyRequests),
            (500, api_exceptions.InternalServerError),
            (403, api_exceptions.Forbidden),
        ]:
            emulator.admin("POST", "fail_calls", {"method": "GetJob", "status": status, "count": 1})
            with pytest.raises(error):
                client.get_job(name=created.name, retry=None)
        # The client's default retry policy rides over a 503 on GetJob, as against Google.
        emulator.admin("POST", "fail_calls", {"method": "GetJob", "status": 503, "count": 1})
        assert client.get_job(name=created.name).name == created.name

    def test_fail_calls_rejects_unknown_methods(self, emulator: Emulator) -> None:
        status, body = emulator.http(
            "POST", "/_emulator/fail_calls", {"method": "MakeCoffee", "status": 503}
        )
        assert status == 400 and "CreateJob" in body["error"]["message"]

    def test_fail_task_at_start_fails_that_attempt_before_it_runs(
        self, client: batch_v1.BatchServiceClient, emulator: Emulator, tmp_path: Path
    ) -> None:
        emulator.admin(
            "POST", "fail_task", {"index": 1, "attempt": 0, "exit_code": 50001, "job_id": None}
        )
        script = f'echo "$BATCH_TASK_RETRY_ATTEMPT" >> "{tmp_path}/$BATCH_TASK_INDEX"'
        done = job_reached(
            client,
            create(client, script_job(script, task_count=2, max_retry_count=1), "preempt").name,
        )

        assert done.status.state == JobState.SUCCEEDED
        assert (tmp_path / "0").read_text() == "0\n"
        assert (tmp_path / "1").read_text() == "1\n"  # attempt 0 never ran
        task = tasks_of(client, done)[1]
        assert exit_codes(task) == [50001, 0]
        job_id = done.name.rsplit("/", 1)[1]
        assert emulator.http("GET", f"/_emulator/tasks/{job_id}/1/0/stdout")[0] == 404
        assert emulator.http("GET", f"/_emulator/tasks/{job_id}/1/1/stdout") == (200, "")
        preempted = task.status.status_events[1]
        assert preempted.description.startswith(
            "Task state is updated from ASSIGNED to FAILED on zones/"
        )
        assert preempted.description.endswith("due to Spot Preemption with exit code 50001.")

    def test_fail_task_after_a_delay_kills_the_running_attempt(
        self, client: batch_v1.BatchServiceClient, emulator: Emulator, tmp_path: Path
    ) -> None:
        job_id = new_id("vm-lost")
        emulator.admin(
            "POST",
            "fail_task",
            {"index": 0, "attempt": 0, "exit_code": 50002, "job_id": job_id, "after_seconds": 0.3},
        )
        # Task 1 finishes by itself before its fault fires: the injected code still wins.
        emulator.admin(
            "POST",
            "fail_task",
            {"index": 1, "attempt": 0, "exit_code": 50001, "job_id": job_id, "after_seconds": 30},
        )
        script = f'echo $$ > "{tmp_path}/pid$BATCH_TASK_INDEX"; [ "$BATCH_TASK_INDEX" = 1 ] || exec sleep 60'
        created = client.create_job(
            parent=PARENT, job=script_job(script, task_count=2), job_id=job_id
        )
        done = job_reached(client, created.name)

        assert done.status.state == JobState.FAILED
        lost, finished = tasks_of(client, done)
        assert exit_codes(lost) == [50002]
        assert lost.status.status_events[-1].description.endswith(
            "due to Batch no longer receives VM updates with exit code 50002."
        )
        assert exit_codes(finished) == [50001]
        assert process_dead(int((tmp_path / "pid0").read_text()))


class TestRobustness:
    @pytest.mark.parametrize(
        ("body", "named"),
        [
            (b"{not json", "Invalid JSON"),
            (b"[1, 2]", "Job object"),
            (b'{"taskGroups": [{"taskCount": "many"}]}', "taskCount"),
            (b'{"taskGroups": [{"taskSpek": {}}]}', "taskSpek"),
            (
                b'{"taskGroups": [{"taskSpec": {"lifecyclePolicies": [{"action": "EXPLODE"}]}}]}',
                "EXPLODE",
            ),
            (b'{"taskGroups": [{"taskCount": "99999999999999999999999"}]}', "taskCount"),
            (b"\xff\xfe", "Invalid JSON"),
        ],
    )
    def test_malformed_create_is_google_400_json(
        self, emulator: Emulator, body: bytes, named: str
    ) -> None:
        status, error = emulator.http("POST", f"/v1/{PARENT}/jobs?jobId={new_id('raw')}", raw=body)
        assert status == 400
        assert error["error"]["status"] == "INVALID_ARGUMENT" and error["error"]["code"] == 400
        assert named in error["error"]["message"]

    def test_bad_paths_and_parameters_get_google_errors(self, emulator: Emulator) -> None:
        status, error = emulator.http("GET", "/v2/nothing/here")
        assert status == 404 and error["error"]["status"] == "NOT_FOUND"
        status, error = emulator.http("POST", f"/v1/{PARENT}/operations/some-op:cancel", raw=b"{}")
        assert status == 501 and error["error"]["status"] == "UNIMPLEMENTED"
        status, error = emulator.http("GET", f"/v1/{PARENT}/jobs?pageToken=garbage")
        assert status == 400 and "page_token" in error["error"]["message"]
        status, error = emulator.http("GET", f"/v1/{PARENT}/jobs?pageSize=-3")
        assert status == 400 and "page_size" in error["error"]["message"]
        status, error = emulator.http("POST", "/_emulator/settings", {"max_running_tasks": 0})
        assert status == 400 and "max_running_tasks" in error["error"]["message"]
        status, error = emulator.http("POST", "/_emulator/fail_task", {"attempt": 0})
        assert status == 400 and "index" in error["error"]["message"]
        assert emulator.http("GET", "/_emulator/stats")[0] == 200

    def test_a_task_that_kills_itself_only_fails_its_task(
        self, client: batch_v1.BatchServiceClient, emulator: Emulator
    ) -> None:
        done = job_reached(
            client, create(client, script_job("kill -9 $$", "exit 0"), "suicide").name
        )

        assert exit_codes(tasks_of(client, done)[0]) == [137]
        assert emulator.process.poll() is None


class TestServerProcess:
    def test_sigterm_stops_the_server_and_kills_its_tasks(self, tmp_path: Path) -> None:
        with run_emulator(tmp_path) as server:
            client = server.client()
            created = create(
                client, script_job(f'echo $$ > "{tmp_path}/pid"; exec sleep 60'), "term"
            )
            wait_until(
                lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(),
                what="the task",
            )
            pid = int((tmp_path / "pid").read_text())
            assert client.get_job(name=created.name).status.state == JobState.RUNNING

            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=20) == 0
        wait_until(lambda: process_dead(pid), timeout=10, what=f"task {pid} to die")

    def test_a_short_quota_window_refuses_then_lets_the_retry_through(self, tmp_path: Path) -> None:
        quota = ("--jobs-per-window", "1", "--quota-window-seconds", "1")
        with run_emulator(tmp_path, *quota) as server:
            settings = server.admin("GET", "settings")
            assert (settings["jobs_per_window"], settings["quota_window_seconds"]) == (1, 1.0)
            client = server.client()
            create(client, script_job("true"), "window")
            with pytest.raises(api_exceptions.TooManyRequests, match="1 jobs per 1 s"):
                create(client, script_job("true"), "window")
            # The client's own retry waits the window out; no sleep in the test.
            patient = Retry(
                predicate=if_exception_type(api_exceptions.TooManyRequests),
                initial=0.2,
                maximum=0.5,
                timeout=30,
            )
            client.create_job(
                parent=PARENT, job=script_job("true"), job_id=new_id("w"), retry=patient
            )
            stats = server.admin("GET", "stats")
            assert stats["jobs_created"] == 2 and stats["quota_refusals"] >= 1
            assert stats["api_calls"]["CreateJob"] == 2 + stats["quota_refusals"]

            # jobs_per_minute is the same quota over a minute.
            now = server.admin("POST", "settings", {"jobs_per_minute": 5})
            assert (now["jobs_per_window"], now["quota_window_seconds"]) == (5, 60.0)

    def test_jobs_per_minute_goes_without_a_window(self, tmp_path: Path) -> None:
        command = [
            sys.executable, "-m", "covalent_gcpbatch_array.local.batch.server",
            "--storage-endpoint", STORAGE_ENDPOINT, "--workdir", str(tmp_path),
            "--jobs-per-minute", "2", "--quota-window-seconds", "5",
        ]  # fmt: skip
        refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2
        assert "--jobs-per-minute has a 60 s window" in refused.stderr

    def test_the_server_dies_with_its_parent(self, tmp_path: Path) -> None:
        # A parent that starts the server, reports its ready line, then waits to be killed.
        parent_code = (
            "import subprocess, sys\n"
            "server = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)\n"
            "print(server.stdout.readline().decode(), end='', flush=True)\n"
            "server.wait()\n"
        )
        command = [
            sys.executable, "-c", parent_code,
            sys.executable, "-m", "covalent_gcpbatch_array.local.batch.server",
            "--port", "0", "--storage-endpoint", STORAGE_ENDPOINT, "--preload", "",
            "--workdir", str(tmp_path / "work"),
        ]  # fmt: skip
        parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert parent.stdout is not None
            ready = json.loads(parent.stdout.readline())
            server = Emulator(ready["endpoint"], parent, tmp_path / "none").client()
            create(server, script_job(f'echo $$ > "{tmp_path}/pid"; exec sleep 60'), "orphan")
            wait_until(
                lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(),
                what="the task",
            )
            task_pid = int((tmp_path / "pid").read_text())

            parent.kill()
            parent.wait()
            wait_until(lambda: process_dead(ready["pid"]), timeout=20, what="the server to die")
            wait_until(lambda: process_dead(task_pid), timeout=10, what="its task to die")
        finally:
            parent.kill()
            parent.wait()
            if parent.stdout is not None:
                parent.stdout.close()
            with contextlib.suppress(ProcessLookupError, NameError):
                os.kill(ready["pid"], signal.SIGKILL)


@pytest.mark.slow
class TestScale:
    def test_a_thousand_and_more_tasks_all_succeed_and_pages_clamp_at_1000(
        self, client: batch_v1.BatchServiceClient, emulator: Emulator, tmp_path: Path
    ) -> None:
        job = script_job(f': > "{tmp_path}/$BATCH_TASK_INDEX"', task_count=1100)
        done = job_reached(client, create(client, job, "scale").name, timeout=300)

        assert done.status.state == JobState.SUCCEEDED
        assert dict(done.status.task_groups["group0"].counts) == {"SUCCEEDED": 1100}
        assert len(list(tmp_path.iterdir())) == 1100
        status, page = emulator.http(
            "GET", f"/v1/{done.name}/taskGroups/group0/tasks?pageSize=5000"
        )
        assert status == 200 and len(page["tasks"]) == 1000 and page["nextPageToken"]
