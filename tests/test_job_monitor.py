"""The job monitor's state machine, on trio's MockClock with a fake Batch and a fake bucket.

:class:`FakeCloud` plays Google's part: each task of the job follows a :class:`TaskScript` in
virtual time (pending, running from ``runs_at``, ended at ``ends_at``), and the bucket holds
the outcome the runner would write when it ended. Every call the monitor makes is recorded
with its virtual time, so the tests check exactly what it asked and when.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import anyio
import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1

from covalent_gcpbatch_array._core.coalescer import Batch, BatchPolicy, Coalescer, Member
from covalent_gcpbatch_array._core.contract import EXIT_MAX_RUN_DURATION, TaskRef
from covalent_gcpbatch_array._core.envelopes import (
    ElectronOrigin,
    encode_error,
    encode_result,
    new_job_key,
)
from covalent_gcpbatch_array._core.job_monitor import (
    STOP_SECONDS,
    ArrayJobContext,
    BatchPayload,
    run_array_job,
)
from covalent_gcpbatch_array._core.outcome import ElectronOutcome
from covalent_gcpbatch_array._core.storage import JobLayout, ManifestEntry, TaskObject
from covalent_gcpbatch_array.config import ExecutorConfig, JobShape
from covalent_gcpbatch_array.exceptions import (
    BatchApiError,
    ElectronCancelledError,
    StorageError,
    TaskInfrastructureError,
    TimeLimitExceeded,
)
from tests.virtual_time import fails_if_stuck, mock_clock_backend

try:
    from google.cloud.storage.exceptions import DataCorruption
except ImportError:  # pragma: no cover  (google-cloud-storage 2.x)
    from google.resumable_media.common import DataCorruption


POLL = 1.0  # poll_freq of every test: polls at t = 0, 1, 2, ...


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Every test here runs on trio's MockClock."""
    return mock_clock_backend()


@dataclass
class TaskScript:
    """What one task does, in seconds after its job was created."""

    ends_at: float | None = None  # when it ends (None: never)
    state: str = "SUCCEEDED"  # how it ends: SUCCEEDED or FAILED
    writes: TaskObject | None = TaskObject.RESULT  # the outcome the runner wrote, if any
    exit_code: int | None = None  # its last attempt's exit code, in its status events
    runs_at: float = 0.5  # when it starts running


@dataclass
class FakeCloud:
    """A fake JobsApi and AsyncTaskStore over one world of scripted tasks."""

    scripts: dict[int, TaskScript]  # index -> what its task does
    key: bytes = field(default_factory=new_job_key)  # the job's HMAC key
    create_error: BatchApiError | None = None  # CreateJob raises it
    get_errors: dict[float, BatchApiError] = field(default_factory=dict)  # GetJob at t raises
    bad_downloads: dict[int, int] = field(default_factory=dict)  # index -> corrupt reads left
    failing_housekeeping: bool = False  # manifest, markers, lease and clean-up raise
    stays_queued: bool = False  # no task ever starts (no capacity)
    calls: list[tuple[float, str, Any]] = field(default_factory=list)  # (t, call, argument)
    created_at: float | None = None  # virtual time of the CreateJob
    deleted: bool = False  # DeleteJob was called
    markers: set[int] = field(default_factory=set)  # indices with a cancelled marker
    job_id: str = ""

    # -- the world --

    def _record(self, call: str, argument: Any = None) -> None:
        self.calls.append((anyio.current_time(), call, argument))

    def _elapsed(self) -> float:
        assert self.created_at is not None
        return anyio.current_time() - self.created_at

    def state_of(self, index: int) -> str:
        script = self.scripts[index]
        if self.stays_queued:
            return "PENDING"
        if script.ends_at is not None and self._elapsed() >= script.ends_at:
            return script.state
        return "RUNNING" if self._elapsed() >= script.runs_at else "PENDING"

    def task(self, index: int) -> batch_v1.Task:
        """The task's whole record, with the status event of its exit code if it has one."""
        status = batch_v1.TaskStatus(state=batch_v1.TaskStatus.State[self.state_of(index)])
        code = self.scripts[index].exit_code
        if code is not None:
            status.status_events.append(
                batch_v1.StatusEvent(
                    description=f"task exited with {code}",
                    task_execution=batch_v1.TaskExecution(exit_code=code),
                )
            )
        name = f"projects/p/locations/r/jobs/{self.job_id}/taskGroups/group0/tasks/{index}"
        return batch_v1.Task(name=name, status=status)

    def _job(self) -> batch_v1.Job:
        states = [self.state_of(index) for index in self.scripts]
        counts: dict[str, int] = {}
        for state in states:
            counts[state] = counts.get(state, 0) + 1
        if all(state in ("SUCCEEDED", "FAILED") for state in states):
            job_state = "FAILED" if "FAILED" in states else "SUCCEEDED"
        else:
            job_state = "QUEUED" if self.stays_queued else "RUNNING"
        return batch_v1.Job(
            status=batch_v1.JobStatus(
                state=batch_v1.JobStatus.State[job_state],
                task_groups={"group0": batch_v1.JobStatus.TaskGroupStatus(counts=counts)},
                status_events=[batch_v1.StatusEvent(description=f"job is {job_state}")],
            )
        )

    # -- JobsApi --

    async def create(self, job_id: str, job: batch_v1.Job) -> batch_v1.Job:
        self._record("CreateJob", job.task_groups[0].task_count)
        if self.create_error is not None:
            raise self.create_error
        self.job_id, self.created_at = job_id, anyio.current_time()
        return job

    async def get(self, job_id: str) -> batch_v1.Job:
        self._record("GetJob")
        error = self.get_errors.pop(self._elapsed(), None)
        if error is not None:
            raise error
        if self.deleted:
            error = BatchApiError(f"Google Batch: reading job {job_id} failed: 404")
            error.__cause__ = api_exceptions.NotFound("job")
            raise error
        return self._job()

    async def task_states(self, job_id: str, states: tuple[str, ...] = ()) -> dict[int, str]:
        self._record("ListTasks", states)
        listed = {index: self.state_of(index) for index in self.scripts}
        return {index: state for index, state in listed.items() if not states or state in states}

    async def get_task(self, job_id: str, index: int) -> batch_v1.Task:
        self._record("GetTask", index)
        return self.task(index)

    async def delete(self, job_id: str) -> None:
        self._record("DeleteJob")
        self.deleted = True

    # -- AsyncTaskStore --

    def layout(self, job_id: str) -> JobLayout:
        return JobLayout("runs", job_id)

    async def download(self, ref: TaskRef, obj: TaskObject) -> bytes | None:
        self._record("download", (ref.index, obj.value))
        script = self.scripts[ref.index]
        if script.writes is not obj or self.state_of(ref.index) not in ("SUCCEEDED", "FAILED"):
            return None
        if self.bad_downloads.get(ref.index):
            self.bad_downloads[ref.index] -= 1
            raise DataCorruption(None, "checksum mismatch")
        if obj is TaskObject.RESULT:
            return encode_result(("value of", ref.index), key=self.key, task=ref)
        return encode_error(ValueError(f"task {ref.index} raised"), key=self.key, task=ref)

    async def exists(self, ref: TaskRef, obj: TaskObject) -> bool:
        self._record("exists", (ref.index, obj.value))
        return obj is TaskObject.CANCELLED and ref.index in self.markers

    async def _housekeeping(self, call: str, argument: Any) -> None:
        self._record(call, argument)
        if self.failing_housekeeping:
            raise StorageError(f"{call} failed")

    async def write_manifest(self, job_id: str, entries: dict[int, ManifestEntry]) -> None:
        await self._housekeeping("write_manifest", sorted(entries))

    async def write_cancelled(self, ref: TaskRef) -> None:
        await self._housekeeping("write_cancelled", ref.index)
        self.markers.add(ref.index)

    async def renew_lease(self, job_id: str) -> None:
        await self._housekeeping("renew_lease", None)

    async def delete_tasks(self, job_id: str) -> int:
        await self._housekeeping("delete_tasks", None)
        return 0

    # -- what happened --

    def times(self, call: str) -> list[float]:
        return [at for at, name, _ in self.calls if name == call]

    def arguments(self, call: str) -> list[Any]:
        return [argument for _, name, argument in self.calls if name == call]


@dataclass
class Electron:
    """What one electron's ``run()`` saw."""

    member: Member[ElectronOutcome] | None = None
    outcome: ElectronOutcome | None = None
    error: BaseException | None = None
    at: float | None = None  # when it got its outcome

    async def wait(self) -> None:
        assert self.member is not None
        try:
            self.outcome = await self.member.wait()
        except Exception as exc:
            self.error = exc
        self.at = anyio.current_time()


def config(**values: Any) -> ExecutorConfig:
    base = {
        "project_id": "my-project",
        "bucket_name": "my-bucket",
        "container_image_uri": "image",
        "poll_freq": POLL,
        "orphan_timeout": 0,
    }
    return ExecutorConfig.from_values(base | values)


async def run_job(
    cloud: FakeCloud,
    *,
    settings: ExecutorConfig | None = None,
    withdrawn: Sequence[int] = (),
    during: Callable[[list[Electron]], Awaitable[None]] | None = None,
    stop_at: float = float("inf"),
) -> list[Electron]:
    """Run one batch of ``len(cloud.scripts)`` electrons through :func:`run_array_job`.

    :param stop_at: when to cancel the job's monitor (the executor's loop stopping)
    """
    settings = settings or config()
    size = len(cloud.scripts)
    policy = BatchPolicy(window=10.0, idle_gap=0.0, max_size=size)

    async def launch(batch: Batch[JobShape, ElectronOutcome]) -> None:
        ctx = ArrayJobContext(jobs=cloud, store=cloud)  # type: ignore[arg-type]
        with anyio.move_on_after(stop_at):
            await run_array_job(batch, ctx)

    electrons = [Electron() for _ in range(size)]
    async with Coalescer(launch) as coalescer, anyio.create_task_group() as tg:
        for index, electron in enumerate(electrons):
            member = electron.member = coalescer.join(settings.shape, policy)
            if member.batch.payload is None:
                member.batch.payload = BatchPayload(key=cloud.key, config=settings)
            member.batch.payload.origins[index] = ElectronOrigin("dispatch", index)
            member.batch.payload.submitted_at[index] = datetime.now(timezone.utc)
        for index, electron in enumerate(electrons):
            assert electron.member is not None
            if index in withdrawn:
                electron.member.withdraw(OSError("upload failed"))
            else:
                electron.member.set_ready()
            tg.start_soon(electron.wait)
        if during is not None:
            await during(electrons)
    return electrons


class TestResults:
    @pytest.mark.anyio
    @fails_if_stuck
    async def test_each_electron_resolves_at_the_first_poll_after_its_own_task(self) -> None:
        cloud = FakeCloud(
            {0: TaskScript(ends_at=2.5), 1: TaskScript(ends_at=0.75), 2: TaskScript(ends_at=4.0)}
        )
        electrons = await run_job(cloud)
        assert [e.at for e in electrons] == [3.0, 1.0, 4.0]
        assert [e.outcome.result for e in electrons if e.outcome] == [
            ("value of", 0),
            ("value of", 1),
            ("value of", 2),
        ]
        assert cloud.times("GetJob") == [0.0, 1.0, 2.0, 3.0, 4.0]
        # A ListTasks at the first poll, then only when the count of finished tasks changed.
        assert cloud.times("ListTasks") == [0.0, 1.0, 3.0, 4.0]
        assert cloud.arguments("write_manifest") == [[0, 1, 2]]
        assert cloud.times("delete_tasks") == [4.0]
        assert not cloud.deleted  # every task finished: nothing to delete

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_a_failed_task_gives_its_electron_the_functions_error(self) -> None:
        cloud = FakeCloud(
            {
                0: TaskScript(ends_at=1.5, state="FAILED", writes=TaskObject.ERROR),
                1: TaskScript(ends_at=1.5),
            }
        )
        first, second = await run_job(cloud)
        assert first.outcome is not None and isinstance(first.outcome.error, ValueError)
        assert "task 0 raised" in str(first.outcome.error)
        assert "ValueError" in first.outcome.traceback_text
        assert second.outcome is not None and second.outcome.result == ("value of", 1)
        # The error is read first for a failed task, the result first for a succeeded one.
        assert sorted(cloud.arguments("download")) == [(0, "error.pkl"), (1, "result.pkl")]

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_a_corrupted_read_is_read_again_after_a_backoff(self) -> None:
        cloud = FakeCloud({0: TaskScript(ends_at=1.0)}, bad_downloads={0: 2})
        (electron,) = await run_job(cloud)
        assert electron.outcome is not None and electron.outcome.result == ("value of", 0)
        assert cloud.times("download") == [1.0, 1.5, 2.5]  # backoffs of 0.5 and 1.0 s

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_corruption_on_every_read_fails_that_electron_only(self) -> None:
        cloud = FakeCloud(
            {0: TaskScript(ends_at=1.0), 1: TaskScript(ends_at=1.0)}, bad_downloads={0: 3}
        )
        first, second = await run_job(cloud)
        assert isinstance(first.error, StorageError)
        assert "could not read the outcome of task 0" in str(first.error)
        assert second.outcome is not None and second.outcome.result == ("value of", 1)


class TestInfrastructureFailures:
    @pytest.mark.anyio
    @fails_if_stuck
    async def test_a_task_without_an_outcome_is_explained_by_its_exit_code(self) -> None:
        cloud = FakeCloud(
            {
                0: TaskScript(ends_at=2.0, state="FAILED", writes=None, exit_code=50001),
                1: TaskScript(
                    ends_at=2.0, state="FAILED", writes=None, exit_code=EXIT_MAX_RUN_DURATION
                ),
            }
        )
        preempted, too_long = await run_job(cloud)
        assert type(preempted.error) is TaskInfrastructureError
        assert preempted.error.exit_code == 50001 and "preempted" in str(preempted.error)
        assert isinstance(too_long.error, TimeLimitExceeded)
        assert sorted(cloud.arguments("GetTask")) == [0, 1]  # the whole task, for its events

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_a_task_stopped_by_its_cancel_marker_is_cancelled(self) -> None:
        cloud = FakeCloud({0: TaskScript(ends_at=1.0, writes=None)})
        cloud.markers.add(0)  # written by another process
        (electron,) = await run_job(cloud)
        assert isinstance(electron.error, ElectronCancelledError)
        assert cloud.arguments("GetTask") == []

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_a_job_that_never_starts_fails_its_electrons_at_queue_timeout(self) -> None:
        cloud = FakeCloud({0: TaskScript(), 1: TaskScript()}, stays_queued=True)
        electrons = await run_job(cloud, settings=config(queue_timeout=5.5))
        for electron in electrons:
            assert isinstance(electron.error, TaskInfrastructureError)
            assert "started no task within queue_timeout=5.5s" in str(electron.error)
            assert electron.error.events == ("job is QUEUED",)
            assert electron.at == 6.0
        assert electrons[0].error is not electrons[1].error  # an error object each
        assert cloud.times("DeleteJob") == [6.0]

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_a_job_deleted_elsewhere_fails_the_electrons_still_waiting(self) -> None:
        cloud = FakeCloud({0: TaskScript(ends_at=1.0), 1: TaskScript()})

        async def delete_it(electrons: list[Electron]) -> None:
            await anyio.sleep(2.5)
            cloud.deleted = True

        first, second = await run_job(cloud, during=delete_it)
        assert first.outcome is not None
        assert isinstance(second.error, TaskInfrastructureError)
        assert "was deleted outside this executor" in str(second.error)
        assert second.at == 3.0

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_a_failed_poll_is_only_logged_and_polled_again(self) -> None:
        cloud = FakeCloud(
            {0: TaskScript(ends_at=1.5)}, get_errors={2.0: BatchApiError("Google Batch: 503")}
        )
        (electron,) = await run_job(cloud)
        assert electron.outcome is not None and electron.at == 3.0
        assert cloud.times("GetJob") == [0.0, 1.0, 2.0, 3.0]

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_a_refused_job_fails_every_electron_with_an_error_of_its_own(self) -> None:
        refusal = BatchApiError("Google Batch: creating job failed: quota")
        refusal.__cause__ = api_exceptions.TooManyRequests("quota")
        cloud = FakeCloud({0: TaskScript(), 1: TaskScript()}, create_error=refusal)
        first, second = await run_job(cloud)
        for electron in (first, second):
            assert isinstance(electron.error, BatchApiError) and electron.at == 0.0
            assert str(electron.error) == str(refusal)
            assert electron.error.__cause__ is refusal.__cause__
        assert first.error is not second.error and refusal not in (first.error, second.error)
        assert cloud.times("GetJob") == []


class TestCancellationAndCleanUp:
    @pytest.mark.anyio
    @fails_if_stuck
    async def test_an_electron_cancelled_after_launch_gets_its_marker(self) -> None:
        cloud = FakeCloud({0: TaskScript(ends_at=3.0), 1: TaskScript()})

        async def cancel_second(electrons: list[Electron]) -> None:
            await anyio.sleep(1.25)
            assert electrons[1].member is not None
            electrons[1].member.cancel()

        first, second = await run_job(cloud, during=cancel_second)
        assert isinstance(second.error, ElectronCancelledError) and second.at == 1.25
        assert first.outcome is not None and first.at == 3.0
        assert cloud.arguments("write_cancelled") == [1]
        assert cloud.times("write_cancelled") == [1.25]
        # Task 1 never finished and nobody waits for it any more: the job goes.
        assert cloud.times("DeleteJob") == [3.0]
        assert cloud.times("delete_tasks") == [3.0]

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_a_slot_withdrawn_before_launch_is_marked_and_never_awaited(self) -> None:
        cloud = FakeCloud({0: TaskScript(ends_at=1.0), 1: TaskScript(ends_at=1.0, writes=None)})
        first, second = await run_job(cloud, withdrawn=[1])
        assert isinstance(second.error, OSError) and second.at == 0.0
        assert first.outcome is not None
        assert cloud.arguments("CreateJob") == [2]  # the slot stays in the job
        assert cloud.arguments("write_manifest") == [[0]]
        assert cloud.arguments("write_cancelled") == [1]
        assert cloud.arguments("download") == [(0, "result.pkl")]

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_housekeeping_failures_never_reach_an_electron(self) -> None:
        cloud = FakeCloud({0: TaskScript(ends_at=1.0), 1: TaskScript()}, failing_housekeeping=True)

        async def cancel_second(electrons: list[Electron]) -> None:
            await anyio.sleep(0.25)
            assert electrons[1].member is not None
            electrons[1].member.cancel()

        first, second = await run_job(cloud, during=cancel_second)
        assert first.outcome is not None and first.outcome.result == ("value of", 0)
        assert isinstance(second.error, ElectronCancelledError)
        assert cloud.times("write_manifest") == [0.0]
        assert cloud.times("write_cancelled") == [0.25]
        assert cloud.times("delete_tasks") == [1.0]

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_objects_are_kept_when_asked(self) -> None:
        cloud = FakeCloud({0: TaskScript(ends_at=1.0)})
        await run_job(cloud, settings=config(keep_objects=True))
        assert cloud.times("delete_tasks") == []

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_the_lease_is_renewed_a_few_times_per_orphan_timeout(self) -> None:
        cloud = FakeCloud({0: TaskScript(ends_at=3.0)})
        (electron,) = await run_job(cloud, settings=config(orphan_timeout=8.0, poll_freq=5.0))
        assert electron.at == 5.0
        # Before the job exists, then every min(poll_freq, orphan_timeout / 4) = 2 s until
        # no electron waits.
        assert cloud.times("renew_lease") == [0.0, 2.0, 4.0]

    @pytest.mark.anyio
    @fails_if_stuck
    async def test_a_stopping_executor_deletes_the_job_then_fails_its_electrons(self) -> None:
        cloud = FakeCloud({0: TaskScript(ends_at=1.0), 1: TaskScript()})
        electrons = await run_job(cloud, stop_at=2.5)
        first, second = electrons
        assert first.outcome is not None and first.at == 1.0
        assert isinstance(second.error, TaskInfrastructureError)
        assert "the executor stopped" in str(second.error) and second.at == 2.5
        deleted_at, failed_at = cloud.times("DeleteJob"), second.at
        assert deleted_at == [2.5] and deleted_at[0] <= failed_at < 2.5 + STOP_SECONDS
        assert cloud.times("delete_tasks") == [2.5]
