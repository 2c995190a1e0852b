"""The Batch emulator's scheduler, in-process, with a fake launcher and (where time matters)
trio's MockClock: slot order, retries, deletion, provisioning delay and time limits, all
deterministic.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from trio.testing import MockClock

from covalent_gcpbatch_array.local.api_errors import ApiError
from covalent_gcpbatch_array.local.batch.scheduler import BatchScheduler, EmulatorSettings
from covalent_gcpbatch_array.local.batch.state import JobRecord, JobState, TaskState

PARENT = "projects/p/locations/us-east1"
_pids = itertools.count(1000)


class FakeProcess:
    """A task process the test ends by hand (or that ends when killed)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], exit_on_kill: bool) -> None:
        self.pid = next(_pids)
        self.argv = list(argv)
        self.env = dict(env)
        self.killed = False
        self._exit_on_kill = exit_on_kill
        self._code: int | None = None
        self._ended = anyio.Event()

    @property
    def task(self) -> tuple[str, int, int]:
        """(job id, task index, attempt) of this process."""
        env = self.env
        return (
            env["BATCH_JOB_ID"],
            int(env["BATCH_TASK_INDEX"]),
            int(env["BATCH_TASK_RETRY_ATTEMPT"]),
        )

    def exit(self, code: int) -> None:
        if self._code is None:
            self._code = code
            self._ended.set()

    async def wait(self) -> int:
        await self._ended.wait()
        assert self._code is not None
        return self._code

    def kill(self) -> None:
        self.killed = True
        if self._exit_on_kill:
            self.exit(137)


class FakeLauncher:
    """Hands every started process to the test through a stream."""

    def __init__(self) -> None:
        self.exit_on_kill = True
        self._send: MemoryObjectSendStream[FakeProcess]
        self._receive: MemoryObjectReceiveStream[FakeProcess]
        self._send, self._receive = anyio.create_memory_object_stream[FakeProcess](math.inf)

    def __enter__(self) -> FakeLauncher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._send.close()
        self._receive.close()

    def container_argv(self, image_uri: str, entrypoint: str, commands: Sequence[str]) -> list[str]:
        return [image_uri, *commands]

    async def start(
        self, argv: Sequence[str], *, env: Mapping[str, str], stdout: Path, stderr: Path
    ) -> FakeProcess:
        process = FakeProcess(argv, env, self.exit_on_kill)
        self._send.send_nowait(process)
        return process

    async def next_started(self) -> FakeProcess:
        with anyio.fail_after(5):
            return await self._receive.receive()

    def nothing_started(self) -> bool:
        try:
            self._receive.receive_nowait()
        except anyio.WouldBlock:
            return True
        return False


def body(task_count: int = 1, parallelism: int = 0, **task_spec: Any) -> bytes:
    spec = {"runnables": [{"script": {"text": "work"}}], **task_spec}
    group = {"taskCount": str(task_count), "parallelism": str(parallelism), "taskSpec": spec}
    return json.dumps({"taskGroups": [group]}).encode()


def create(scheduler: BatchScheduler, job_id: str, payload: bytes) -> JobRecord:
    return scheduler.create_job(PARENT, job_id, None, payload)


async def settle() -> None:
    """Let every task that can make progress do so (no time passes on the mock clock)."""
    await anyio.wait_all_tasks_blocked()


@pytest.fixture
def launcher() -> Iterator[FakeLauncher]:
    with FakeLauncher() as fake:
        yield fake


@pytest.fixture
async def running(
    tmp_path: Path, launcher: FakeLauncher
) -> AsyncIterator[tuple[BatchScheduler, FakeLauncher]]:
    scheduler = BatchScheduler(launcher, workdir=tmp_path, storage_endpoint="http://gcs")
    async with anyio.create_task_group() as tg:
        await tg.start(scheduler.run)
        yield scheduler, launcher
        tg.cancel_scope.cancel()


mock_clock = pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio-mock-clock")],
)


class TestSlots:
    @pytest.mark.anyio
    async def test_the_cap_gives_free_slots_to_the_oldest_job_first(
        self, running: tuple[BatchScheduler, FakeLauncher]
    ) -> None:
        scheduler, launcher = running
        scheduler.configure({"max_running_tasks": 2})
        create(scheduler, "old", body(3))
        create(scheduler, "new", body(2))

        first, second = await launcher.next_started(), await launcher.next_started()
        assert [first.task, second.task] == [("old", 0, 0), ("old", 1, 0)]
        await settle()
        assert launcher.nothing_started()
        first.exit(0)
        assert (await launcher.next_started()).task == ("old", 2, 0)
        second.exit(0)
        assert (await launcher.next_started()).task == ("new", 0, 0)

    @pytest.mark.anyio
    async def test_a_retry_takes_the_next_slot_before_untried_tasks(
        self, running: tuple[BatchScheduler, FakeLauncher]
    ) -> None:
        scheduler, launcher = running
        job = create(scheduler, "retry", body(3, parallelism=1, maxRetryCount=1))

        first = await launcher.next_started()
        assert first.task == ("retry", 0, 0)
        first.exit(9)
        again = await launcher.next_started()
        assert again.task == ("retry", 0, 1)
        assert job.tasks[0].state is TaskState.RUNNING
        assert [event.task_state for event in job.tasks[0].events] == [
            TaskState.ASSIGNED,
            TaskState.RUNNING,
            TaskState.FAILED,
            TaskState.PENDING,
            TaskState.ASSIGNED,
            TaskState.RUNNING,
        ]
        assert scheduler.stats.task_attempts == 2

    @pytest.mark.anyio
    async def test_raising_the_cap_at_run_time_starts_waiting_tasks(
        self, running: tuple[BatchScheduler, FakeLauncher]
    ) -> None:
        scheduler, launcher = running
        scheduler.configure({"max_running_tasks": 1})
        create(scheduler, "cap", body(3))
        await launcher.next_started()
        await settle()
        assert launcher.nothing_started()

        scheduler.configure({"max_running_tasks": None})
        started = {(await launcher.next_started()).task for _ in range(2)}
        assert started == {("cap", 1, 0), ("cap", 2, 0)}


class TestDeletion:
    @mock_clock
    @pytest.mark.anyio
    async def test_deleting_kills_running_marks_the_rest_unexecuted_then_forgets_the_job(
        self, tmp_path: Path, launcher: FakeLauncher
    ) -> None:
        scheduler = BatchScheduler(
            launcher,
            workdir=tmp_path,
            storage_endpoint="",
            settings=EmulatorSettings(deletion_delay=3.0),
        )
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            launcher.exit_on_kill = False  # the "process" takes its time to die
            job = create(scheduler, "doomed", body(3, parallelism=1, maxRetryCount=2))
            process = await launcher.next_started()

            operation = scheduler.delete_job(job.name)
            await settle()
            assert process.killed and not operation.done
            assert job.state is JobState.DELETION_IN_PROGRESS
            assert [task.state for task in job.tasks] == [
                TaskState.FAILED,
                TaskState.UNEXECUTED,
                TaskState.UNEXECUTED,
            ]
            assert scheduler.delete_job(job.name) is operation  # a repeat: the same operation
            process.exit(137)
            await anyio.sleep(2.9)  # virtual time: within the deletion delay
            assert scheduler.get_job(job.name) is job and not operation.done
            await anyio.sleep(0.2)
            with pytest.raises(ApiError) as gone:
                scheduler.get_job(job.name)
            assert gone.value.code == 404
            assert scheduler.get_operation(operation.name).done
            assert launcher.nothing_started()  # no retry of the killed attempt
            assert scheduler.stats.task_attempts == 1
            tg.cancel_scope.cancel()

    @mock_clock
    @pytest.mark.anyio
    async def test_deleting_before_provisioning_ends_runs_nothing(
        self, tmp_path: Path, launcher: FakeLauncher
    ) -> None:
        settings = EmulatorSettings(provisioning_delay=5.0)
        scheduler = BatchScheduler(
            launcher, workdir=tmp_path, storage_endpoint="", settings=settings
        )
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            job = create(scheduler, "early", body(2))
            scheduler.delete_job(job.name)
            await anyio.sleep(10)  # virtual time: well past the provisioning delay
            assert launcher.nothing_started()
            assert [task.state for task in job.tasks] == [TaskState.UNEXECUTED] * 2
            tg.cancel_scope.cancel()

    @pytest.mark.anyio
    async def test_without_a_delay_an_idle_job_is_gone_at_once(
        self, running: tuple[BatchScheduler, FakeLauncher]
    ) -> None:
        scheduler, _ = running
        scheduler.configure({"deletion_delay": 0, "provisioning_delay": 60})
        job = create(scheduler, "quick", body(1))
        assert scheduler.delete_job(job.name).done
        with pytest.raises(ApiError):
            scheduler.get_job(job.name)


class TestCancellation:
    @mock_clock
    @pytest.mark.anyio
    async def test_cancelling_stops_the_tasks_and_keeps_the_job_cancelled(
        self, tmp_path: Path, launcher: FakeLauncher
    ) -> None:
        settings = EmulatorSettings(cancellation_delay=4.0)
        scheduler = BatchScheduler(
            launcher, workdir=tmp_path, storage_endpoint="", settings=settings
        )
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            job = create(scheduler, "halt", body(2, parallelism=1))
            process = await launcher.next_started()
            operation = scheduler.cancel_job(job.name)
            await settle()
            assert process.killed and job.state is JobState.CANCELLATION_IN_PROGRESS
            assert [task.state for task in job.tasks] == [TaskState.FAILED, TaskState.UNEXECUTED]
            await anyio.sleep(5)
            assert job.state is JobState.CANCELLED and operation.done
            assert scheduler.get_job(job.name) is job
            assert launcher.nothing_started()
            with pytest.raises(ApiError) as ended:
                scheduler.cancel_job(job.name)
            assert (ended.value.code, ended.value.status) == (400, "FAILED_PRECONDITION")
            tg.cancel_scope.cancel()


class TestPriority:
    @pytest.mark.anyio
    async def test_a_higher_priority_job_gets_the_free_slot_first(
        self, running: tuple[BatchScheduler, FakeLauncher]
    ) -> None:
        scheduler, launcher = running
        scheduler.configure({"max_running_tasks": 1})
        first = create(scheduler, "holder", body(1))
        holder = await launcher.next_started()
        low = json.loads(body(1))
        high = {**low, "priority": "50"}
        create(scheduler, "low", json.dumps(low).encode())
        create(scheduler, "high", json.dumps(high).encode())
        await settle()
        holder.exit(0)
        assert (await launcher.next_started()).task[0] == "high"
        assert first.spec.priority == 0


class TestTime:
    @mock_clock
    @pytest.mark.anyio
    async def test_provisioning_delay_holds_every_task_until_it_is_over(
        self, tmp_path: Path, launcher: FakeLauncher
    ) -> None:
        settings = EmulatorSettings(provisioning_delay=30.0)
        scheduler = BatchScheduler(
            launcher, workdir=tmp_path, storage_endpoint="", settings=settings
        )
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            job = create(scheduler, "slow-vms", body(2))
            await anyio.sleep(29.9)
            assert job.state is JobState.SCHEDULED
            assert launcher.nothing_started()
            await anyio.sleep(0.2)
            assert {(await launcher.next_started()).task for _ in range(2)} == {
                ("slow-vms", 0, 0),
                ("slow-vms", 1, 0),
            }
            assert job.state is JobState.RUNNING
            tg.cancel_scope.cancel()

    @mock_clock
    @pytest.mark.anyio
    async def test_max_run_duration_and_a_delayed_fault_end_attempts_with_their_codes(
        self, tmp_path: Path, launcher: FakeLauncher
    ) -> None:
        scheduler = BatchScheduler(launcher, workdir=tmp_path, storage_endpoint="")
        scheduler.task_faults.add(
            index=1, attempt=0, exit_code=50001, job_id="limits", after_seconds=5
        )
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            job = create(scheduler, "limits", body(2, maxRunDuration="60s"))
            stuck = [await launcher.next_started() for _ in range(2)]

            await anyio.sleep(10)
            assert [task.state for task in job.tasks] == [TaskState.RUNNING, TaskState.FAILED]
            assert job.tasks[1].events[-1].exit_code == 50001
            await anyio.sleep(60)
            assert job.tasks[0].events[-1].exit_code == 50005
            assert all(process.killed for process in stuck)
            assert job.state is JobState.FAILED
            tg.cancel_scope.cancel()


class TestQuotaSettings:
    @pytest.mark.anyio
    async def test_a_window_of_its_own_refuses_creates_and_counts_them(
        self, running: tuple[BatchScheduler, FakeLauncher]
    ) -> None:
        scheduler, _ = running
        now = scheduler.configure({"jobs_per_window": 1, "quota_window_seconds": 5})
        assert (now["jobs_per_window"], now["quota_window_seconds"]) == (1, 5.0)
        assert now["jobs_per_minute"] is None  # the quota is not a per-minute one

        create(scheduler, "first", body())
        for attempt in range(2):
            with pytest.raises(ApiError) as refused:
                create(scheduler, f"refused-{attempt}", body())
            assert refused.value.code == 429 and "1 jobs per 5 s" in refused.value.message
        assert (scheduler.stats.jobs_created, scheduler.stats.quota_refusals) == (1, 2)
        assert scheduler.stats.to_json()["quota_refusals"] == 2

    @pytest.mark.anyio
    async def test_jobs_per_minute_sets_the_quota_and_a_minute_window(
        self, running: tuple[BatchScheduler, FakeLauncher]
    ) -> None:
        scheduler, _ = running
        scheduler.configure({"jobs_per_window": 3, "quota_window_seconds": 5})
        now = scheduler.configure({"jobs_per_minute": 7})
        assert (now["jobs_per_window"], now["quota_window_seconds"], now["jobs_per_minute"]) == (
            7,
            60.0,
            7,
        )
        now = scheduler.configure({"jobs_per_minute": None})
        assert (now["jobs_per_window"], now["jobs_per_minute"]) == (None, None)
        for index in range(10):
            create(scheduler, f"free-{index}", body())
        assert scheduler.stats.quota_refusals == 0

    @pytest.mark.parametrize(
        "changes",
        [
            {"jobs_per_minute": 1, "quota_window_seconds": 5},
            {"jobs_per_minute": 1, "jobs_per_window": 1},
            {"jobs_per_window": 0},
            {"jobs_per_window": 2, "quota_window_seconds": 0},
            {"quota_window_seconds": float("inf")},
            {"quota_window_seconds": "5"},
            {"quota_window": 5},
        ],
    )
    def test_bad_quota_settings_are_refused_and_nothing_changes(
        self, tmp_path: Path, launcher: FakeLauncher, changes: dict[str, Any]
    ) -> None:
        scheduler = BatchScheduler(launcher, workdir=tmp_path, storage_endpoint="")
        before = scheduler.settings_json()
        with pytest.raises(ValueError):
            scheduler.configure(changes)
        assert scheduler.settings_json() == before
