"""Crash safety (issue 12): what the executor leaves behind when it, or its job-mates, go wrong.

Every test runs the real executor against a LocalCloud of its module, through the real Google
clients; nothing is mocked. Where a race has to be made to happen, a real call is answered
late, never faked.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import cloudpickle
import covalent as ct
import pytest
from covalent._shared_files.exceptions import TaskCancelledError, TaskRuntimeError
from electrons import FAST, executor_for
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1
from google.cloud.storage.retry import DEFAULT_RETRY
from test_inspect_cli import run_json  # a sibling test module (tests/ is on sys.path)

from covalent_gcpbatch_array._core import runtime
from covalent_gcpbatch_array._core.contract import EXIT_ORPHANED, TaskRef
from covalent_gcpbatch_array._core.jobs import TASK_STATE_FIELDS, JobsApi, new_job_id
from covalent_gcpbatch_array._core.outcome import task_exit_code
from covalent_gcpbatch_array._core.runtime import ExecutorRuntime
from covalent_gcpbatch_array._core.storage import AsyncTaskStore, TaskObject, TaskStore
from covalent_gcpbatch_array.cli.covalent_server import CovalentServer
from covalent_gcpbatch_array.exceptions import StorageError
from covalent_gcpbatch_array.local import LocalCloud
from tests.polling import wait_until

pytestmark = pytest.mark.slow

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud() as local_cloud:
        yield local_cloud


def store_of(cloud: LocalCloud) -> TaskStore:
    return TaskStore(cloud.storage_client(), cloud.bucket_name, "covalent-gcpbatch-array")


def square(x: int) -> int:
    return x * x


def sleep_then(seconds: float) -> str:
    time.sleep(seconds)
    return "finished"


class TestSucceededJobsAreKept:
    """A job whose electrons all succeeded is never deleted, even when GetJob's counts lag."""

    @pytest.mark.anyio
    async def test_a_stale_job_record_does_not_delete_the_job(
        self, cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        read_job = JobsApi.get

        async def late_get(self: JobsApi, job_id: str) -> Any:
            # The job record is read first and arrives only once every task has finished:
            # its counts are stale by then, as when a task ends between GetJob and ListTasks.
            job = await read_job(self, job_id)
            count = job.task_groups[0].task_count
            done = ("SUCCEEDED",)
            while len(await self.list_tasks(job_id, done, fields=TASK_STATE_FIELDS)) < count:  # noqa: ASYNC110
                await anyio.sleep(0.05)
            return job

        monkeypatch.setattr(JobsApi, "get", late_get)
        before = cloud.stats()["api_calls"].get("DeleteJob", 0)
        results = {}

        async def one(index: int) -> None:
            ex = executor_for(cloud)
            results[index] = await ex.run(
                square, [index], {}, {"dispatch_id": "stale", "node_id": index}
            )

        async with anyio.create_task_group() as tg:
            for index in range(3):
                tg.start_soon(one, index)
        await ExecutorRuntime.wait_idle()
        assert results == {0: 0, 1: 1, 2: 4}
        assert cloud.stats()["api_calls"].get("DeleteJob", 0) == before


class TestCancelledElsewhere:
    """A task stopped by its cancel marker ends as CANCELLED, whoever wrote the marker."""

    @pytest.mark.anyio
    async def test_a_marker_written_by_another_process(self, cloud: LocalCloud) -> None:
        ex = executor_for(cloud)
        store = store_of(cloud)

        async def cancel_from_elsewhere() -> None:
            await ex.handle_set.wait()
            assert ex.handle is not None
            ref = TaskRef(ex.handle["job_id"], ex.handle["task_index"])
            # Another process: its own client, nothing of this process's executor.
            uploaded = functools.partial(store.exists, ref, TaskObject.INPUT)
            while not await anyio.to_thread.run_sync(uploaded):  # noqa: ASYNC110 (the bucket)
                await anyio.sleep(0.1)
            await anyio.to_thread.run_sync(store.write_cancelled, ref)

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_from_elsewhere)
            with pytest.raises(TaskCancelledError, match="cancel"):
                await ex.run(sleep_then, [60], {}, {"dispatch_id": "elsewhere", "node_id": 1})
        await ExecutorRuntime.wait_idle()


#: A fan-out in a process of its own, as a user's script runs it: n electrons that sleep.
FAN_OUT = """
import asyncio, json, sys, time
from covalent_gcpbatch_array.gcpbatch_array import GCPBatchArrayExecutor

def sleeper(i):
    time.sleep(600)
    return i

async def main(config, n):
    async def one(i):
        executor = GCPBatchArrayExecutor(**config)
        await executor.run(sleeper, [i], {}, {"dispatch_id": "crash", "node_id": i})
    await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


asyncio.run(main(json.loads(sys.argv[1]), int(sys.argv[2])))
"""


class NewJob:
    """The one job that appears in ``cloud`` after construction."""

    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud = cloud
        self.client = cloud.batch_client()
        self.parent = f"projects/{cloud.project_id}/locations/{cloud.region}"
        self.before = self.job_ids()
        self.job_id = ""

    def job_ids(self) -> set[str]:
        return {job.name.rsplit("/", 1)[-1] for job in self.client.list_jobs(parent=self.parent)}

    def wait_for_job(self, *states: int) -> batch_v1.Job:
        """Wait until the process created its job and the job is in one of ``states``."""

        def found() -> bool:
            if not self.job_id:
                self.job_id = next(iter(self.job_ids() - self.before), "")
            return bool(self.job_id) and self.job().status.state in states

        wait_until(found, what=lambda: f"a job in {states}: {self.job_id or 'none'}", timeout=120)
        return self.job()

    def job(self) -> batch_v1.Job:
        return self.client.get_job(name=f"{self.parent}/jobs/{self.job_id}")

    def job_gone(self) -> bool:
        try:
            state = self.job().status.state
        except api_exceptions.NotFound:
            return True
        return state == batch_v1.JobStatus.State.DELETION_IN_PROGRESS

    def exit_codes(self) -> set[int | None]:
        """The last exit code of each of the job's tasks."""
        tasks = self.client.list_tasks(parent=f"{self.parent}/jobs/{self.job_id}/taskGroups/group0")
        return {task_exit_code(task) for task in tasks}


class FanOutProcess(NewJob):
    """A child process running :data:`FAN_OUT`, and the one job it creates."""

    def __init__(self, cloud: LocalCloud, electrons: int = 3, **overrides: Any) -> None:
        super().__init__(cloud)
        config = cloud.executor_config() | FAST | overrides
        self.process = subprocess.Popen(
            [sys.executable, "-c", FAN_OUT, json.dumps(config), str(electrons)],
            env=os.environ | cloud.environment(),
        )

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=120)


class TestGracefulStop:
    """SIGINT or SIGTERM of a process using the executor deletes the jobs it owns at once."""

    @pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
    def test_a_signal_while_running_deletes_the_job(
        self, cloud: LocalCloud, signum: signal.Signals
    ) -> None:
        deletes = cloud.stats()["api_calls"].get("DeleteJob", 0)
        child = FanOutProcess(cloud)
        child.wait_for_job(batch_v1.JobStatus.State.RUNNING)
        child.stop(signum)
        # Deleted by the stopping process itself, not later by anyone else.
        assert child.job_gone()
        assert cloud.stats()["api_calls"].get("DeleteJob", 0) - deletes == 1


#: A short orphan_timeout for the tests: the lease is renewed every poll_freq (0.2 s).
ORPHAN_TIMEOUT = 3.0
_STATE = batch_v1.JobStatus.State


class TestKilledExecutor:
    """kill -9 of the process that owns a job: its tasks stop by themselves (the lease)."""

    def test_killed_while_running(self, cloud: LocalCloud) -> None:
        child = FanOutProcess(cloud, orphan_timeout=ORPHAN_TIMEOUT)
        child.wait_for_job(_STATE.RUNNING)
        child.stop(signal.SIGKILL)
        # Each task sees the lease age past orphan_timeout at its next check and exits with a
        # code the lifecycle policy never retries: the job ends, no task runs for nobody.
        assert wait_until(lambda: child.job().status.state in (_STATE.FAILED,), timeout=120)
        assert child.exit_codes() == {EXIT_ORPHANED}

    def test_killed_while_scheduled(self, cloud: LocalCloud) -> None:
        settings = cloud.settings()
        cloud.configure(provisioning_delay=ORPHAN_TIMEOUT + 3)
        try:
            child = FanOutProcess(cloud, orphan_timeout=ORPHAN_TIMEOUT)
            child.wait_for_job(_STATE.QUEUED, _STATE.SCHEDULED)
            child.stop(signal.SIGKILL)
            # When its VMs come, the tasks find the lease stale and exit before running.
            assert wait_until(lambda: child.job().status.state in (_STATE.FAILED,), timeout=120)
            assert child.exit_codes() == {EXIT_ORPHANED}
        finally:
            cloud.configure(provisioning_delay=settings["provisioning_delay"])


class TestGcEndsOrphans:
    """`gcpbatch-array gc` deletes unfinished jobs whose lease is stale, and only those."""

    def test_a_killed_executors_queued_job(
        self, cloud: LocalCloud, capsys: pytest.CaptureFixture[str]
    ) -> None:
        settings = cloud.settings()
        cloud.configure(provisioning_delay=300)  # its tasks would not start before gc
        try:
            child = FanOutProcess(cloud, orphan_timeout=ORPHAN_TIMEOUT)
            child.wait_for_job(_STATE.QUEUED, _STATE.SCHEDULED)
            # Its owner is alive and renews the lease: never touched.
            assert child.job_id not in run_json(cloud, capsys, "gc", "--dry-run")["deleted_orphans"]
            child.stop(signal.SIGKILL)

            def listed() -> bool:
                report = run_json(cloud, capsys, "gc", "--dry-run")
                return child.job_id in report["deleted_orphans"]

            assert wait_until(listed, timeout=60, interval=0.5)
            assert child.job().status.state in (_STATE.QUEUED, _STATE.SCHEDULED)  # a dry run
            report = run_json(cloud, capsys, "gc")
            assert child.job_id in report["deleted_orphans"]
            assert child.job_gone()
        finally:
            cloud.configure(provisioning_delay=settings["provisioning_delay"])


def folder_objects(cloud: LocalCloud, job_id: str) -> list[str]:
    bucket = cloud.storage_client().bucket(cloud.bucket_name)
    return sorted(b.name for b in bucket.list_blobs(prefix=f"covalent-gcpbatch-array/{job_id}/"))


class TestCancelLeavesNothing:
    """Cancelling leaves no object behind, and a late cancel writes nothing."""

    @pytest.mark.anyio
    async def test_every_electron_cancelled_before_the_flush(self, cloud: LocalCloud) -> None:
        jobs_before = cloud.stats()["jobs_created"]
        executors = [executor_for(cloud, batch_window=600.0, batch_idle_gap=0.0) for _ in range(3)]
        store = store_of(cloud)

        async def one(index: int) -> None:
            with pytest.raises(TaskCancelledError):
                await executors[index].run(
                    square, [index], {}, {"dispatch_id": "early", "node_id": index}
                )

        async with anyio.create_task_group() as tg:
            for index in range(3):
                tg.start_soon(one, index)
            for ex in executors:
                await ex.handle_set.wait()
            refs = [TaskRef(ex.handle["job_id"], ex.handle["task_index"]) for ex in executors]
            for ref in refs:  # each input uploaded, then its electron cancelled
                uploaded = functools.partial(store.exists, ref, TaskObject.INPUT)
                while not await anyio.to_thread.run_sync(uploaded):  # noqa: ASYNC110 (bucket)
                    await anyio.sleep(0.1)
            for ex in executors:
                assert await ex.cancel({}, ex.handle)
        await ExecutorRuntime.wait_idle()
        assert cloud.stats()["jobs_created"] == jobs_before  # no job for nobody
        assert folder_objects(cloud, refs[0].job_id) == []  # no input, no marker

    @pytest.mark.anyio
    async def test_a_cancel_after_the_clean_up_writes_no_marker(self, cloud: LocalCloud) -> None:
        ex = executor_for(cloud)
        assert await ex.run(square, [3], {}, {"dispatch_id": "late", "node_id": 1}) == 9
        await ExecutorRuntime.wait_idle()
        assert ex.handle is not None
        assert await ex.cancel({}, ex.handle)
        assert folder_objects(cloud, ex.handle["job_id"]) == [
            f"covalent-gcpbatch-array/{ex.handle['job_id']}/manifest.json"
        ]


def uploads_in_flight() -> int:
    """How many threads of this process are writing an object (inside ``TaskStore.upload``)."""
    code = TaskStore.upload.__code__
    found = 0
    for frame in sys._current_frames().values():
        caller: Any = frame
        while caller is not None and caller.f_code is not code:
            caller = caller.f_back
        found += caller is not None
    return found


async def four_squares(cloud: LocalCloud) -> dict[int, Any]:
    """Electrons 0-3 of one batch (its window 1 s, ``upload_timeout`` 2 s): each one's result
    or TaskRuntimeError."""
    outcomes: dict[int, Any] = {}

    async def one(index: int) -> None:
        ex = executor_for(cloud, batch_window=1.0, batch_idle_gap=0.0, upload_timeout=2.0)
        metadata = {"dispatch_id": "doomed", "node_id": index}
        try:
            outcomes[index] = await ex.run(square, [index], {}, metadata)
        except TaskRuntimeError as exc:
            outcomes[index] = exc

    async with anyio.create_task_group() as tg:
        for index in range(4):
            tg.start_soon(one, index)
    await ExecutorRuntime.wait_idle()
    return outcomes


@pytest.fixture(scope="module")
def faulty_cloud() -> Iterator[LocalCloud]:
    """A LocalCloud whose Cloud Storage requests can be made to fail."""
    with LocalCloud(gcs_faults=True) as local_cloud:
        yield local_cloud


class TestADoomedUpload:
    """One input upload that keeps failing does not hold its job-mates (issue 12), and goes on
    no longer than its electron waits for it."""

    @staticmethod
    def assert_left_the_batch(outcomes: dict[int, Any]) -> None:
        assert {index: outcomes[index] for index in range(3)} == {0: 0, 1: 1, 2: 4}
        error = outcomes[3]
        assert isinstance(error, TaskRuntimeError)
        assert isinstance(error.__cause__, StorageError)
        assert "was not uploaded within 2 s" in str(error.__cause__)
        assert "upload_timeout" in str(error.__cause__)

    @pytest.mark.anyio
    async def test_its_electron_leaves_the_batch_the_rest_run(
        self, faulty_cloud: LocalCloud
    ) -> None:
        # Every upload of task 3's input answers 503: the client retries it for 120 s.
        faulty_cloud.fail_storage("POST", 503, count=10_000, path="tasks/3/input.pkl")
        outcomes = await four_squares(faulty_cloud)
        # Its retries ended with its electron: no thread goes on writing it (before: one did
        # for 120 s, and a user's process could not exit until it had given up).
        assert uploads_in_flight() == 0
        faulty_cloud.clear_storage_faults()
        self.assert_left_the_batch(outcomes)

    def test_upload_timeout_0_waits_as_long_as_the_upload_takes(self, cloud: LocalCloud) -> None:
        assert runtime.batch_policy(executor_for(cloud).config).settle_timeout == 60.0
        config = executor_for(cloud, upload_timeout=0).config
        assert runtime.batch_policy(config).settle_timeout == math.inf

    @pytest.mark.anyio
    async def test_an_upload_gives_up_at_the_stores_timeout(self, faulty_cloud: LocalCloud) -> None:
        faulty_cloud.fail_storage("POST", 503, count=10_000, path="tasks/0/input.pkl")
        client = faulty_cloud.storage_client()
        retry = DEFAULT_RETRY.with_timeout(2.0)
        store = AsyncTaskStore(TaskStore(client, faulty_cloud.bucket_name, "p", retry=retry))
        try:
            with pytest.raises(StorageError, match=r"503 .*gave up after retrying for 2 s"):
                await store.upload_input(TaskRef(new_job_id(), 0), b"input")
        finally:
            faulty_cloud.clear_storage_faults()
        assert uploads_in_flight() == 0

    @pytest.mark.anyio
    async def test_an_input_landing_after_its_electron_left_is_deleted(
        self, cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        write = TaskStore.upload_input
        landed = threading.Event()
        late: list[TaskRef] = []

        def late_write(self: TaskStore, ref: TaskRef, data: bytes, **options: Any) -> None:
            # Task 3's input is written late, once its job-mates' job has run and been cleaned
            # up (its folder keeps only the manifest): long after its electron left the batch.
            if ref.index == 3:
                late.append(ref)
                manifest = f"covalent-gcpbatch-array/{ref.job_id}/manifest.json"
                wait_until(lambda: folder_objects(cloud, ref.job_id) == [manifest], timeout=120)
            write(self, ref, data, **options)
            if ref.index == 3:
                landed.set()

        monkeypatch.setattr(TaskStore, "upload_input", late_write)
        outcomes = await four_squares(cloud)
        job_id = late[0].job_id
        # Its run() ended only after the write in flight, and deleted what it wrote (before:
        # the write went on in its thread and the input stayed in the bucket, for gc).
        assert landed.is_set()
        assert folder_objects(cloud, job_id) == [f"covalent-gcpbatch-array/{job_id}/manifest.json"]
        self.assert_left_the_batch(outcomes)


def covalent_stop(server: CovalentServer) -> None:
    """Run ``covalent stop`` against ``server``, as its user would: SIGINT to the uvicorn
    process, then wait for it to exit."""
    covalent = Path(sys.executable).with_name("covalent")
    subprocess.run(
        [str(covalent), "stop"],
        env=server.environment(),
        cwd=server.home,
        check=True,
        capture_output=True,
        timeout=180,
    )


class TestCovalentServerStop:
    """`covalent stop` of the server running the electrons deletes the jobs it owns."""

    def test_a_running_fan_out_is_deleted_and_cleaned_up(self, cloud: LocalCloud) -> None:
        electron = ct.electron(sleep_then, executor="gcpbatch_array")

        @ct.lattice(executor="local", workflow_executor="local")
        def fan_out(n: int) -> list[str]:
            return [electron(600) for _ in range(n)]

        settings = cloud.executor_config() | FAST | {"batch_window": 2.0, "batch_idle_gap": 1.0}
        with CovalentServer(executor_config=settings) as server:
            new_job = NewJob(cloud)
            deletes = cloud.stats()["api_calls"].get("DeleteJob", 0)
            ct.dispatch(fan_out, dispatcher_addr=server.address)(3)
            new_job.wait_for_job(_STATE.RUNNING)
            covalent_stop(server)
            assert not server.is_running()
        # Deleted by the stopping server itself, not later by anyone else.
        assert new_job.job_gone()
        assert cloud.stats()["api_calls"].get("DeleteJob", 0) - deletes == 1
        assert folder_objects(cloud, new_job.job_id) == [
            f"covalent-gcpbatch-array/{new_job.job_id}/manifest.json"
        ]
