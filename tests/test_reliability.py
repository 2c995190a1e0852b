"""The fault suite: every electron of a fan-out ends with exactly one outcome, and the right one.

Against the local cloud with the real clients: preemption and VM loss (first and later
attempts, retries exhausted), tasks killed mid-run or ending without writing anything, 429 and
503 from the Batch API (bursts, the job-creation quota), transient Cloud Storage errors and
dropped connections (through the fault proxy), a job deleted by someone else, a job that never
starts, time limits, a retried attempt after a success, and user errors (never retried).
For each electron the test checks its value (which names its own input), its own exception,
or a clear infrastructure error, and counts the task attempts.
"""

from __future__ import annotations

import functools
import gc
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import cloudpickle
import pytest
import requests
from electrons import (
    Delta,
    FanOut,
    Spec,
    check_exactly_one_outcome,
    check_infrastructure_error,
    check_user_error,
    check_value,
    executor_for,
    expected_value,
    fan_out,
    new_token,
    work,
)
from google.cloud import batch_v1

from covalent_gcpbatch_array.exceptions import StorageError, TimeLimitExceeded
from covalent_gcpbatch_array.local import LocalCloud
from covalent_gcpbatch_array.local.gcs.proxy import serve

pytestmark = [
    pytest.mark.slow,
    # google-cloud-storage leaves the response of a failed download for the garbage collector
    # to close (see test_storage.py), and these tests fail many; each collects its own leaks.
    pytest.mark.filterwarnings(
        "ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
    ),
]

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud(gcs_faults=True) as local_cloud:
        yield local_cloud


@pytest.fixture(autouse=True)
def no_faults_left(cloud: LocalCloud) -> Iterator[None]:
    """Each test uses up the faults it plans; a failing one must not leak them into the next."""
    yield
    gc.collect()
    leftover = cloud.clear_storage_faults()
    assert leftover == 0, f"{leftover} planned storage faults were not used"


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll the local cloud's state (other processes) until ``condition`` holds (30 s)."""
    with anyio.fail_after(30):
        while not await anyio.to_thread.run_sync(condition):  # noqa: ASYNC110
            await anyio.sleep(0.1)


def running_tasks(cloud: LocalCloud) -> int:
    """How many tasks of the cloud's jobs are RUNNING now."""
    client = cloud.batch_client()
    parent = f"projects/{cloud.project_id}/locations/{cloud.region}"
    total = 0
    for job in client.list_jobs(parent=parent):
        if job.status.task_groups:
            total += int(job.status.task_groups["group0"].counts.get("RUNNING", 0))
    return total


def specs(count: int, behaviours: dict[int, tuple[str, object]] | None = None) -> list[Spec]:
    token = new_token()
    chosen = behaviours or {}
    return [Spec(i, token, *chosen.get(i, ("ok", 0))) for i in range(count)]


def all_right(fan: FanOut) -> None:
    check_exactly_one_outcome(fan)
    for outcome in fan:
        check_value(outcome)


class TestJobCreationQuota:
    # First in the module: no job of another test is in the quota's window.
    @pytest.mark.anyio
    async def test_job_creation_quota_exceeded_for_a_while(self, cloud: LocalCloud) -> None:
        # One job per 5 s (Google counts per minute; a short window keeps the test short). As
        # soon as the electrons have joined their batch, someone else's job fills the window,
        # so the batch's create (2 s after the first join) meets 429 RESOURCE_EXHAUSTED and is
        # retried, with the same request id, until the window moves on.
        client = cloud.batch_client()
        parent = f"projects/{cloud.project_id}/locations/{cloud.region}"
        runnable = batch_v1.Runnable(script=batch_v1.Runnable.Script(text="true"))
        filler = batch_v1.Job(
            task_groups=[batch_v1.TaskGroup(task_spec=batch_v1.TaskSpec(runnables=[runnable]))]
        )
        create_filler = functools.partial(
            client.create_job, parent=parent, job_id=f"quota-filler-{new_token()}", job=filler
        )

        async def fill_the_window(_: dict[int, tuple[str, int]]) -> None:
            await anyio.to_thread.run_sync(create_filler)

        cloud.configure(jobs_per_window=1, quota_window_seconds=5)
        try:
            delta = Delta(cloud)
            fan = await fan_out(
                cloud, specs(4), deadline=240, while_running=fill_the_window, batch_window=2
            )
            all_right(fan)
            assert len({outcome.handle["job_id"] for outcome in fan if outcome.handle}) == 1
            assert delta["jobs_created"] == 2  # the filler and the batch's one job
            refusals = delta["quota_refusals"]
            assert refusals >= 1  # the batch's create met the full window
            assert delta["CreateJob"] == 2 + refusals  # every refusal was retried until created
        finally:
            cloud.configure(jobs_per_minute=None)


class TestPreemption:
    @pytest.mark.anyio
    async def test_preempted_and_lost_vms_on_first_and_later_attempts(
        self, cloud: LocalCloud
    ) -> None:
        delta = Delta(cloud)
        # Faults for the next job created: this fan-out's single job.
        cloud.fail_task(index=1, attempt=0, exit_code=50001)
        cloud.fail_task(index=2, attempt=0, exit_code=50001)
        cloud.fail_task(index=2, attempt=1, exit_code=50001)
        cloud.fail_task(index=3, attempt=0, exit_code=50002)  # VM stopped reporting
        cloud.fail_task(index=4, attempt=0, exit_code=50006)  # VM deleted
        cloud.fail_task(index=4, attempt=1, exit_code=50003)  # VM rebooted
        cloud.fail_task(index=4, attempt=2, exit_code=50001)
        fan = await fan_out(cloud, specs(8), retries=3)
        all_right(fan)
        assert delta["jobs_created"] == 1
        assert delta["task_attempts"] == 8 + 1 + 2 + 1 + 3

    @pytest.mark.anyio
    async def test_retries_exhausted_fail_only_that_electron(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        cloud.fail_task(index=2, attempt=0, exit_code=50001)
        cloud.fail_task(index=2, attempt=1, exit_code=50001)
        cloud.fail_task(index=5, attempt=0, exit_code=50002)
        cloud.fail_task(index=5, attempt=1, exit_code=50002)
        fan = await fan_out(cloud, specs(6), retries=1)
        check_exactly_one_outcome(fan)
        tasks = fan.by_task()
        assert len({job for job, _ in tasks}) == 1
        for (_, index), outcome in tasks.items():
            if index == 2:
                cause = check_infrastructure_error(outcome, "preempted", "retries=1")
                assert cause.exit_code == 50001
            elif index == 5:
                cause = check_infrastructure_error(outcome, "stopped reporting", "2 attempt(s)")
                assert cause.exit_code == 50002
            else:
                check_value(outcome)
        assert delta["task_attempts"] == 6 + 2


class TestTasksThatDie:
    @pytest.mark.anyio
    async def test_a_task_killed_mid_run_is_retried(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        cloud.fail_task(index=0, attempt=0, exit_code=137, after_seconds=1.0)
        cloud.fail_task(index=1, attempt=0, exit_code=50001, after_seconds=1.0)
        fan = await fan_out(cloud, specs(3, {0: ("sleep", 3), 1: ("sleep", 3)}), retries=1)
        all_right(fan)
        assert delta["task_attempts"] == 3 + 2

    @pytest.mark.anyio
    async def test_a_task_killed_mid_run_without_retries_is_an_infrastructure_error(
        self, cloud: LocalCloud
    ) -> None:
        cloud.fail_task(index=0, attempt=0, exit_code=137, after_seconds=1.0)
        fan = await fan_out(cloud, specs(1, {0: ("sleep", 5)}), retries=0)
        check_exactly_one_outcome(fan)
        cause = check_infrastructure_error(fan[0], "exited with code 137 without writing")
        assert cause.exit_code == 137

    @pytest.mark.anyio
    async def test_tasks_that_end_without_writing_anything(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        behaviours = {1: ("exit_silently", 0), 2: ("crash_until", 99), 3: ("crash_until", 1)}
        fan = await fan_out(cloud, specs(5, behaviours), retries=2)
        check_exactly_one_outcome(fan)
        # Exit 0 with nothing written: Batch calls it a success, the executor does not.
        check_infrastructure_error(
            fan[1], "exited with code 0 without writing a result", "after 1 attempt(s)"
        )
        cause = check_infrastructure_error(fan[2], "code 17", "3 attempt(s)")
        assert cause.exit_code == 17
        for index in (0, 3, 4):
            check_value(fan[index])
        assert delta["task_attempts"] == 5 + 2 + 1


class TestBatchApiFaults:
    @pytest.mark.anyio
    async def test_429_and_503_bursts_on_job_creation(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        cloud.fail_calls("CreateJob", 429, 2)
        cloud.fail_calls("CreateJob", 503, 2)
        fan = await fan_out(cloud, specs(6))
        all_right(fan)
        assert delta["jobs_created"] == 1
        assert delta["CreateJob"] == 5

    @pytest.mark.anyio
    async def test_dropped_connections_to_the_batch_api(self, cloud: LocalCloud) -> None:
        # The fault proxy is plain HTTP: here it stands in front of the Batch emulator.
        # A reset connection is what a busy front end or a NAT timeout looks like.
        delta = Delta(cloud)
        async with anyio.create_task_group() as tg:
            endpoint = await tg.start(serve, cloud.batch_endpoint)

            def plan(**fault: object) -> None:
                answer = requests.post(f"{endpoint}/_proxy/faults", json=fault, timeout=10)
                answer.raise_for_status()

            # The create lands, but its answer is lost: the retry must find the same job.
            await anyio.to_thread.run_sync(
                functools.partial(plan, method="POST", drop=True, lose_answer=True, path="/jobs?")
            )
            await anyio.to_thread.run_sync(
                functools.partial(plan, method="GET", drop=True, count=4)
            )
            fan = await fan_out(cloud, specs(4), batch_api_endpoint=endpoint)
            stats = await anyio.to_thread.run_sync(
                lambda: requests.get(f"{endpoint}/_proxy/stats", timeout=10).json()
            )
            tg.cancel_scope.cancel()
        all_right(fan)
        assert stats["dropped"] == 5 and stats["pending"] == 0
        assert delta["jobs_created"] == 1

    @pytest.mark.anyio
    async def test_429_and_503_bursts_on_get_and_list(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        cloud.fail_calls("GetJob", 503, 3)
        cloud.fail_calls("ListTasks", 429, 2)
        cloud.fail_calls("GetJob", 429, 2)
        cloud.fail_calls("ListTasks", 503, 2)
        fan = await fan_out(cloud, specs(6))
        all_right(fan)
        assert delta["GetJob"] >= 5 + 1
        assert delta["ListTasks"] >= 4 + 1


class TestStorageFaults:
    @pytest.mark.anyio
    async def test_input_upload_errors_and_drops(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        cloud.fail_storage("POST", 503, 2, path="/tasks/1/input.pkl")
        cloud.fail_storage("POST", 500, 1, path="/tasks/2/input.pkl")
        cloud.fail_storage("POST", drop=True, count=2, path="/tasks/3/input.pkl")
        fan = await fan_out(cloud, specs(5))
        all_right(fan)
        assert delta.storage("failed") == 3
        assert delta.storage("dropped") == 2

    @pytest.mark.anyio
    async def test_task_download_errors_and_drops(self, cloud: LocalCloud) -> None:
        # Only tasks download inputs: these faults prove the tasks go through the proxy too.
        delta = Delta(cloud)
        cloud.fail_storage("GET", 503, 2, path="/tasks/0/input.pkl?alt=media")
        cloud.fail_storage("GET", drop=True, count=1, path="/tasks/1/input.pkl?alt=media")
        cloud.fail_storage(
            "GET", drop=True, lose_answer=True, count=1, path="/tasks/2/input.pkl?alt=media"
        )
        fan = await fan_out(cloud, specs(4))
        all_right(fan)
        assert delta.storage("failed") + delta.storage("dropped") == 4
        assert delta["task_attempts"] == 4  # the client's retries absorbed them all

    @pytest.mark.anyio
    async def test_lost_answers_on_the_result_write(self, cloud: LocalCloud) -> None:
        # The write lands, its answer is lost, the retry meets 412: the runner must see that
        # its own result is there, not write another one or fail the task.
        cloud.fail_storage("POST", 503, 1, path="/tasks/0/result.pkl", lose_answer=True)
        cloud.fail_storage("POST", drop=True, count=1, path="/tasks/1/result.pkl", lose_answer=True)
        fan = await fan_out(cloud, specs(3))
        all_right(fan)
        assert cloud.storage_stats()["pending"] == 0

    @pytest.mark.anyio
    async def test_result_download_errors_and_truncations(self, cloud: LocalCloud) -> None:
        cloud.fail_storage("GET", 503, 2, path="/tasks/0/result.pkl?alt=media")
        cloud.fail_storage(
            "GET", drop=True, lose_answer=True, count=2, path="/tasks/1/result.pkl?alt=media"
        )
        cloud.fail_storage("GET", 429, 1, path="/tasks/3/result.pkl?alt=media")
        cloud.fail_storage("POST", 503, 1, path="/tasks/2/error.pkl")
        cloud.fail_storage("GET", 503, 1, path="/tasks/2/error.pkl?alt=media")
        fan = await fan_out(cloud, specs(4, {2: ("raise", 0)}))
        check_exactly_one_outcome(fan)
        check_user_error(fan[2])
        for index in (0, 1, 3):
            check_value(fan[index])

    @pytest.mark.anyio
    async def test_storage_refusing_a_tasks_writes(self, cloud: LocalCloud) -> None:
        # A permission problem on the task's side: the runner exits 1, Batch retries, and the
        # electron's error says where the runner's own explanation is.
        delta = Delta(cloud)
        cloud.fail_storage("POST", 403, count=1000, path="/tasks/1/result.pkl")
        try:
            fan = await fan_out(cloud, specs(3), retries=1)
        finally:
            cloud.clear_storage_faults()
        check_exactly_one_outcome(fan)
        for (job_id, index), outcome in fan.by_task().items():
            if index != 1:
                check_value(outcome)
                continue
            cause = check_infrastructure_error(
                outcome, "runner could not do its work", f"gcpbatch-array logs {job_id} 1"
            )
            assert cause.exit_code == 1
            log = cloud.task_output(job_id, 1, attempt=1, stream="stderr")
            assert "Cloud Storage refused" in log and "roles/storage.objectAdmin" in log
        assert delta["task_attempts"] == 3 + 1

    @pytest.mark.anyio
    async def test_a_result_storage_will_not_give_fails_only_its_electron(
        self, cloud: LocalCloud
    ) -> None:
        cloud.fail_storage("GET", 403, count=1000, path="/tasks/1/result.pkl?alt=media")
        try:
            fan = await fan_out(cloud, specs(3))
        finally:
            cloud.clear_storage_faults()
        check_exactly_one_outcome(fan)
        for (_, index), outcome in fan.by_task().items():
            if index == 1:
                assert isinstance(outcome.cause, StorageError), repr(outcome.error)
                assert "refused to read result.pkl of task 1" in str(outcome.cause)
            else:
                check_value(outcome)

    @pytest.mark.anyio
    async def test_bit_rot_in_transit_is_caught_and_read_again(self, cloud: LocalCloud) -> None:
        # One byte flipped on the way: the client's checksum (or the HMAC) catches it, and a
        # second read gets the right bytes; on the task side (input), and on ours (result).
        delta = Delta(cloud)
        cloud.fail_storage("GET", corrupt=True, path="/tasks/0/input.pkl?alt=media")
        cloud.fail_storage("GET", corrupt=True, path="/tasks/1/result.pkl?alt=media")
        fan = await fan_out(cloud, specs(3), retries=1)
        all_right(fan)
        assert delta.storage("corrupted") == 2

    @pytest.mark.anyio
    async def test_manifest_marker_and_cleanup_errors(self, cloud: LocalCloud) -> None:
        cloud.fail_storage("POST", 503, 2, path="manifest.json")
        cloud.fail_storage("DELETE", 503, 2)
        fan = await fan_out(cloud, specs(3))
        all_right(fan)
        # The cleanup runs once the job's electrons are done: its deletes are retried.
        await wait_for(lambda: cloud.storage_stats()["pending"] == 0)


class TestHousekeepingFailures:
    """Cleanup and cancel markers are housekeeping: when they fail, no outcome may change."""

    @pytest.mark.anyio
    async def test_cleanup_that_keeps_failing_touches_no_outcome(
        self, cloud: LocalCloud, caplog: pytest.LogCaptureFixture
    ) -> None:
        # The job's cleanup is refused (403: not retried) after its electrons got their results.
        # Earlier tests may raise the root logger's level: capture the executor's own warnings.
        caplog.set_level(logging.WARNING, logger="covalent_gcpbatch_array")
        cloud.fail_storage("DELETE", 403, count=1000)
        try:
            fan = await fan_out(cloud, specs(3))
            warned = re.compile(r"could not delete the task objects of job (\S+) \(carrying on\)")
            await wait_for(lambda: bool(warned.search(caplog.text)))
        finally:
            cloud.clear_storage_faults()
        all_right(fan)
        match = warned.search(caplog.text)
        assert match is not None
        client = cloud.storage_client()
        folder = f"/{match.group(1)}/tasks/"
        left = [blob.name for blob in client.list_blobs(cloud.bucket_name) if folder in blob.name]
        assert left, "the refused cleanup left the task objects for gc and the lifecycle rule"

    @pytest.mark.anyio
    async def test_a_cancel_marker_that_cannot_be_written_touches_no_job_mate(
        self, cloud: LocalCloud, tmp_path: Path
    ) -> None:
        # The electron's own run() is cancelled (as when Covalent stops waiting for it): the
        # monitor writes its task's marker, and storage refuses.
        release = tmp_path / "release"
        refused_before = cloud.storage_stats()["failed"]
        cloud.fail_storage("POST", 403, count=1000, path="/cancelled")
        token = new_token()
        batch = [Spec(i, token, "wait_file", str(release)) for i in range(3)]
        outcomes: dict[int, object] = {}

        async def one(
            spec: Spec, scope_ready: anyio.Event, scopes: dict[int, anyio.CancelScope]
        ) -> None:
            with anyio.CancelScope() as scope:
                scopes[spec.index] = scope
                scope_ready.set()
                ex = executor_for(cloud)
                try:
                    outcomes[spec.index] = await ex.run(
                        work, [spec], {}, {"dispatch_id": token, "node_id": spec.index}
                    )
                except Exception as exc:
                    outcomes[spec.index] = exc

        try:
            scopes: dict[int, anyio.CancelScope] = {}
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for spec in batch:
                        ready = anyio.Event()
                        tg.start_soon(one, spec, ready, scopes)
                        await ready.wait()
                    await wait_for(lambda: cloud.stats()["api_calls"]["ListTasks"] > 0)
                    await wait_for(lambda: running_tasks(cloud) >= 3)
                    scopes[1].cancel()
                    await wait_for(lambda: cloud.storage_stats()["failed"] > refused_before)
                    release.touch()
        finally:
            cloud.clear_storage_faults()
        assert 1 not in outcomes  # its run() was cancelled: no outcome to hand back
        for index in (0, 2):
            assert outcomes[index] == expected_value(batch[index]), outcomes[index]


class TestJobsGoneOrStuck:
    @pytest.mark.anyio
    async def test_a_job_deleted_by_someone_else_mid_run(
        self, cloud: LocalCloud, tmp_path: Path
    ) -> None:
        release = tmp_path / "release"
        batch = specs(3, {i: ("wait_file", str(release)) for i in range(3)})
        client = cloud.batch_client()
        parent = f"projects/{cloud.project_id}/locations/{cloud.region}"

        def delete(name: str) -> None:
            client.delete_job(name=name).result()

        async def delete_when_running() -> None:
            while True:
                jobs = await anyio.to_thread.run_sync(lambda: list(client.list_jobs(parent=parent)))
                for job in jobs:
                    counts = (
                        job.status.task_groups["group0"].counts if job.status.task_groups else {}
                    )
                    if job.status.state.name == "RUNNING" and int(counts.get("RUNNING", 0)) == 3:
                        await anyio.to_thread.run_sync(delete, job.name)
                        return
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(delete_when_running)
            fan = await fan_out(cloud, batch)
        release.touch()
        check_exactly_one_outcome(fan)
        for outcome in fan:
            check_infrastructure_error(outcome, "deleted")

    @pytest.mark.anyio
    async def test_a_job_that_never_starts_gives_up_after_queue_timeout(
        self, cloud: LocalCloud
    ) -> None:
        delta = Delta(cloud)
        cloud.configure(provisioning_delay=3600)  # Batch waits for VMs it cannot get
        try:
            fan = await fan_out(cloud, specs(3), queue_timeout=2)
        finally:
            cloud.configure(provisioning_delay=0)
        check_exactly_one_outcome(fan)
        for outcome in fan:
            check_infrastructure_error(
                outcome, "started no task within queue_timeout=2s", "SCHEDULED", "quota"
            )
        assert delta["task_attempts"] == 0
        # The job is deleted as its monitor ends, just after the electrons got their errors:
        # nothing keeps waiting in Batch for capacity.
        await wait_for(lambda: delta["DeleteJob"] == 1)

    @pytest.mark.anyio
    async def test_time_limit_hit_by_some_tasks(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        fan = await fan_out(cloud, specs(4, {1: ("sleep", 60), 3: ("sleep", 60)}), time_limit=2)
        check_exactly_one_outcome(fan)
        for index in (1, 3):
            cause = check_infrastructure_error(fan[index], "time_limit=2s")
            assert isinstance(cause, TimeLimitExceeded)
        for index in (0, 2):
            check_value(fan[index])
        assert delta["task_attempts"] == 4

    @pytest.mark.anyio
    async def test_a_time_limit_hit_is_not_retried_a_preemption_is(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        cloud.fail_task(index=2, attempt=0, exit_code=50001)
        fan = await fan_out(cloud, specs(3, {1: ("sleep", 60)}), time_limit=2, retries=2)
        check_exactly_one_outcome(fan)
        cause = check_infrastructure_error(fan[1], "time_limit=2s")
        assert isinstance(cause, TimeLimitExceeded)
        assert "after 1 attempt(s) (retries=2)" in str(cause)
        for index in (0, 2):
            check_value(fan[index])
        assert delta["task_attempts"] == 4  # 0 once, 1 once (not retried), 2 preempted then run


class TestRetriesAndUserErrors:
    @pytest.mark.anyio
    async def test_a_retried_attempt_after_a_success_keeps_the_first_result(
        self, cloud: LocalCloud
    ) -> None:
        # The attempt writes its result and exits 0, but Batch records exit 50001 (the VM was
        # reclaimed as the task ended) and runs the task again: the result must stay the first.
        delta = Delta(cloud)
        cloud.fail_task(index=0, attempt=0, exit_code=50001, after_seconds=60)
        cloud.fail_task(index=2, attempt=0, exit_code=50001, after_seconds=60)
        batch = specs(3, {i: ("report_attempt", 0) for i in range(3)})
        fan = await fan_out(cloud, batch, retries=2)
        check_exactly_one_outcome(fan)
        tasks = fan.by_task()
        for (job_id, index), outcome in tasks.items():
            check_value(
                outcome, f"{outcome.spec.token}:{outcome.spec.index}:{outcome.spec.index**2}@0"
            )
            if index in (0, 2):
                second = cloud.task_output(job_id, index, attempt=1, stream="stderr")
                assert "already succeeded: nothing to do" in second
        assert delta["task_attempts"] == 3 + 2

    @pytest.mark.anyio
    async def test_user_errors_are_never_retried(self, cloud: LocalCloud) -> None:
        delta = Delta(cloud)
        behaviours = {i: ("raise", 0) for i in range(0, 20, 4)}
        fan = await fan_out(cloud, specs(20, behaviours), retries=3)
        check_exactly_one_outcome(fan)
        for outcome in fan:
            if outcome.spec.behaviour == "raise":
                check_user_error(outcome)
            else:
                check_value(outcome)
        assert delta["task_attempts"] == 20
