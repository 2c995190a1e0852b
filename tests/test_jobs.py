"""The array job definition, and the async facade against the local cloud's Batch emulator."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1

from covalent_gcpbatch_array._core import jobs as batch
from covalent_gcpbatch_array._core.clients import make_batch_client
from covalent_gcpbatch_array._core.contract import EXIT_NO_INPUT, EXIT_ORPHANED, EXIT_USER_ERROR
from covalent_gcpbatch_array._core.jobs import (
    CANCEL_CHECKS_PER_SECOND,
    CREATED_BY_LABEL,
    TASK_STATE_FIELDS,
    JobsApi,
    build_job,
    new_job_id,
)
from covalent_gcpbatch_array.config import DEFAULTS, ExecutorConfig, JobShape
from covalent_gcpbatch_array.exceptions import BatchApiError
from covalent_gcpbatch_array.local import LocalCloud


def shape(**overrides: Any) -> JobShape:
    values = DEFAULTS | {
        "project_id": "my-project",
        "bucket_name": "my-bucket",
        "container_image_uri": "us-docker.pkg.dev/p/r/runner:1",
    }
    return ExecutorConfig.from_values(values | overrides).shape


class TestJobId:
    def test_valid_and_unique(self) -> None:
        ids = {new_job_id() for _ in range(1000)}
        assert len(ids) == 1000
        for job_id in ids:
            assert re.fullmatch(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?", job_id)


class TestBuildJob:
    def test_one_task_spec_for_all_tasks(self) -> None:
        job = build_job(shape(), task_count=42, job_prefix="pfx/j", hmac_key="00ff")
        (group,) = job.task_groups
        assert group.task_count == 42
        spec = group.task_spec
        (runnable,) = spec.runnables
        assert runnable.container.image_uri == "us-docker.pkg.dev/p/r/runner:1"
        assert list(runnable.container.commands) == ["-m", "covalent_gcpbatch_array.runner"]
        assert spec.compute_resource.cpu_milli == 2000
        assert spec.compute_resource.memory_mib == 256
        assert spec.max_retry_count == 3
        assert spec.max_run_duration.seconds == 300
        assert dict(spec.environment.variables) == {
            "CGA_BUCKET": "my-bucket",
            "CGA_JOB_PREFIX": "pfx/j",
            "CGA_HMAC_KEY": "00ff",
            "CGA_CANCEL_POLL_SECONDS": "2",
            "CGA_ORPHAN_TIMEOUT_SECONDS": "600.0",
        }

    @pytest.mark.parametrize(
        ("task_count", "parallelism", "seconds"),
        [(1, 0, 2.0), (100, 0, 2.0), (1000, 0, 20.0), (1000, 100, 2.0), (5000, 0, 60.0)],
    )
    def test_big_jobs_check_their_cancel_markers_less_often(
        self, task_count: int, parallelism: int, seconds: float
    ) -> None:
        job = build_job(
            shape(parallelism=parallelism), task_count=task_count, job_prefix="p/j", hmac_key=""
        )
        variables = job.task_groups[0].task_spec.environment.variables
        assert float(variables["CGA_CANCEL_POLL_SECONDS"]) == seconds
        # In all, the running tasks of a job read their markers at most ~50 times a second,
        # unless that would leave a cancelled task running for more than a minute.
        running = min(task_count, parallelism or task_count)
        assert running / seconds <= CANCEL_CHECKS_PER_SECOND or seconds == 60.0

    def test_user_errors_are_never_retried(self) -> None:
        (policy,) = (
            build_job(shape(), task_count=1, job_prefix="p/j", hmac_key="")
            .task_groups[0]
            .task_spec.lifecycle_policies
        )
        assert policy.action == batch_v1.LifecyclePolicy.Action.FAIL_TASK
        # The function raised, the job is orphaned, the task has no input, or the attempt ran
        # past time_limit: retries are for VM faults.
        assert list(policy.action_condition.exit_codes) == [
            EXIT_USER_ERROR,
            EXIT_ORPHANED,
            EXIT_NO_INPUT,
            50005,
        ]

    def test_job_shape_settings_reach_the_allocation_policy(self) -> None:
        job = build_job(
            shape(
                machine_type="n1-standard-4",
                provisioning_model="SPOT",
                accelerator_type="nvidia-tesla-t4",
                accelerator_count=2,
                boot_disk_size_gb=100,
                network="projects/p/global/networks/n",
                subnetwork="projects/p/regions/us-east1/subnetworks/s",
                service_account_email="runner@my-project.iam.gserviceaccount.com",
                labels={"team": "ml"},
                parallelism=8,
                task_count_per_node=2,
                region="europe-west4",
            ),
            task_count=3,
            job_prefix="p/j",
            hmac_key="",
        )
        policy = job.allocation_policy
        (instance,) = policy.instances
        assert instance.policy.machine_type == "n1-standard-4"
        assert (
            instance.policy.provisioning_model == batch_v1.AllocationPolicy.ProvisioningModel.SPOT
        )
        assert instance.policy.accelerators[0].type_ == "nvidia-tesla-t4"
        assert instance.policy.accelerators[0].count == 2
        assert instance.install_gpu_drivers
        assert instance.policy.boot_disk.size_gb == 100
        assert policy.network.network_interfaces[0].subnetwork.endswith("subnetworks/s")
        assert policy.service_account.email.startswith("runner@")
        assert list(policy.location.allowed_locations) == ["regions/europe-west4"]
        assert job.labels["team"] == "ml"
        assert job.labels[CREATED_BY_LABEL[0]] == CREATED_BY_LABEL[1]
        assert job.task_groups[0].parallelism == 8
        assert job.task_groups[0].task_count_per_node == 2
        assert job.logs_policy.destination == batch_v1.LogsPolicy.Destination.CLOUD_LOGGING

    def test_definition_stays_small_whatever_the_task_count(self) -> None:
        # The work list lives in the bucket, not in the job: 100,000 tasks fit in 1 MB.
        job = build_job(shape(), task_count=100_000, job_prefix="p/j", hmac_key="ab" * 32)
        assert len(batch_v1.Job.serialize(job)) < 2_000


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud() as local_cloud:
        yield local_cloud


def script_job(command: str = "true", task_count: int = 2) -> batch_v1.Job:
    job = build_job(shape(), task_count=task_count, job_prefix="p/j", hmac_key="")
    job.task_groups[0].task_spec.runnables[0] = batch_v1.Runnable(
        script=batch_v1.Runnable.Script(text=command)
    )
    return job


class TestBatchJobs:
    def jobs(self, cloud: LocalCloud) -> JobsApi:
        return JobsApi(make_batch_client(cloud.batch_endpoint), cloud.project_id, cloud.region)

    @pytest.mark.anyio
    async def test_create_get_list_delete(self, cloud: LocalCloud) -> None:
        jobs = self.jobs(cloud)
        job_id = new_job_id()
        created = await jobs.create(job_id, script_job("sleep 30"))
        assert created.name == jobs.job_name(job_id)
        assert (await jobs.get(job_id)).uid == created.uid
        assert job_id in {job.name.rsplit("/", 1)[-1] for job in await jobs.list_jobs()}
        await jobs.delete(job_id)
        with pytest.raises(BatchApiError) as info:
            await jobs.get(job_id)
        assert isinstance(info.value.__cause__, api_exceptions.NotFound)
        await jobs.delete(job_id)  # already gone: not an error

    @pytest.mark.anyio
    async def test_list_tasks_filters_by_state(self, cloud: LocalCloud) -> None:
        jobs = self.jobs(cloud)
        job_id = new_job_id()
        await jobs.create(job_id, script_job('[ "$BATCH_TASK_INDEX" = 0 ] || exit 7', 3))
        with anyio.fail_after(30):  # the emulator is another process: poll it
            while (await jobs.get(job_id)).status.state != batch_v1.JobStatus.State.FAILED:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        succeeded = await jobs.list_tasks(job_id, ("SUCCEEDED",))
        failed = await jobs.list_tasks(job_id, ("FAILED",))
        both = await jobs.list_tasks(job_id, ("SUCCEEDED", "FAILED"))
        assert [t.name.rsplit("/", 1)[-1] for t in succeeded] == ["0"]
        assert sorted(t.name.rsplit("/", 1)[-1] for t in failed) == ["1", "2"]
        assert len(both) == 3

    @pytest.mark.anyio
    async def test_list_jobs_shows_only_this_executors_jobs(self, cloud: LocalCloud) -> None:
        jobs = self.jobs(cloud)
        foreign = script_job()
        foreign.labels = {"created-by": "someone-else"}
        foreign_id = new_job_id()
        await jobs.create(foreign_id, foreign)
        assert foreign_id not in {job.name.rsplit("/", 1)[-1] for job in await jobs.list_jobs()}

    @pytest.mark.anyio
    async def test_create_retries_transient_errors_once_only_one_job(
        self, cloud: LocalCloud
    ) -> None:
        jobs = self.jobs(cloud)
        before = cloud.stats()
        cloud.fail_calls("CreateJob", status=429, count=1)
        cloud.fail_calls("CreateJob", status=503, count=1)
        await jobs.create(new_job_id(), script_job())
        after = cloud.stats()
        assert after["jobs_created"] - before["jobs_created"] == 1
        assert after["api_calls"]["CreateJob"] - before["api_calls"]["CreateJob"] == 3

    @pytest.mark.anyio
    async def test_a_create_that_finds_its_own_job_succeeds(self, cloud: LocalCloud) -> None:
        # The first create landed but its answer was lost; the retry sees ALREADY_EXISTS.
        jobs = self.jobs(cloud)
        job_id = new_job_id()
        first = await jobs.create(job_id, script_job())
        again = await jobs.create(job_id, script_job())
        assert again.uid == first.uid

    @pytest.mark.anyio
    async def test_someone_elses_job_with_the_same_id_is_an_error(self, cloud: LocalCloud) -> None:
        jobs = self.jobs(cloud)
        job_id = new_job_id()
        await jobs.create(job_id, script_job())
        other = script_job()
        other.task_groups[0].task_spec.environment.variables["CGA_JOB_PREFIX"] = "other/j"
        with pytest.raises(BatchApiError, match=r"409|ALREADY_EXISTS|already exists"):
            await jobs.create(job_id, other)

    @pytest.mark.anyio
    async def test_bad_definition_is_a_clear_error(self, cloud: LocalCloud) -> None:
        jobs = self.jobs(cloud)
        job = script_job()
        job.task_groups[0].task_spec.max_retry_count = 11
        with pytest.raises(BatchApiError, match="job definition"):
            await jobs.create(new_job_id(), job)


async def wait_job_state(jobs: JobsApi, job_id: str, state: int) -> None:
    with anyio.fail_after(60):  # the emulator is another process: poll it
        while (await jobs.get(job_id)).status.state != state:  # noqa: ASYNC110
            await anyio.sleep(0.1)


class TestTaskFieldMask:
    def jobs(self, cloud: LocalCloud) -> JobsApi:
        return JobsApi(make_batch_client(cloud.batch_endpoint), cloud.project_id, cloud.region)

    @pytest.mark.anyio
    async def test_state_fields_bring_names_and_states_only(self, cloud: LocalCloud) -> None:
        jobs = self.jobs(cloud)
        job_id = new_job_id()
        await jobs.create(job_id, script_job('[ "$BATCH_TASK_INDEX" = 1 ] && exit 7; exit 0', 3))
        await wait_job_state(jobs, job_id, batch_v1.JobStatus.State.FAILED)
        whole = await jobs.list_tasks(job_id, ("SUCCEEDED", "FAILED"))
        masked = await jobs.list_tasks(job_id, ("SUCCEEDED", "FAILED"), fields=TASK_STATE_FIELDS)
        assert [(t.name, t.status.state) for t in masked] == [
            (t.name, t.status.state) for t in whole
        ]
        assert [t.status.state.name for t in masked] == ["SUCCEEDED", "FAILED", "SUCCEEDED"]
        assert all(t.status.status_events for t in whole)
        assert not any(t.status.status_events for t in masked)
        # What the mask leaves out, one task's whole record has.
        failed = await jobs.get_task(job_id, 1)
        assert failed.name == masked[1].name
        assert [e.task_execution.exit_code for e in failed.status.status_events][-1] == 7

    @pytest.mark.anyio
    async def test_pages_follow_even_when_the_mask_omits_the_token(
        self, cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        jobs = self.jobs(cloud)
        job_id = new_job_id()
        await jobs.create(job_id, script_job("true", 5))
        await wait_job_state(jobs, job_id, batch_v1.JobStatus.State.SUCCEEDED)
        before = cloud.stats()["api_calls"]["ListTasks"]
        monkeypatch.setattr(batch, "TASK_PAGE_SIZE", 2)
        tasks = await jobs.list_tasks(job_id, fields=("tasks.name",))
        assert [int(t.name.rsplit("/", 1)[-1]) for t in tasks] == [0, 1, 2, 3, 4]
        assert cloud.stats()["api_calls"]["ListTasks"] - before == 3

    @pytest.mark.anyio
    async def test_an_unknown_field_is_a_clear_error(self, cloud: LocalCloud) -> None:
        jobs = self.jobs(cloud)
        job_id = new_job_id()
        await jobs.create(job_id, script_job())
        with pytest.raises(BatchApiError, match=r"tasks\.nmae") as info:
            await jobs.list_tasks(job_id, fields=("tasks.nmae",))
        assert isinstance(info.value.__cause__, api_exceptions.BadRequest)
        assert "job definition" not in str(info.value)  # that advice is for creates

    @pytest.mark.anyio
    async def test_get_task_of_a_missing_task_is_not_found(self, cloud: LocalCloud) -> None:
        jobs = self.jobs(cloud)
        job_id = new_job_id()
        await jobs.create(job_id, script_job())
        with pytest.raises(BatchApiError, match="task 9 of job") as info:
            await jobs.get_task(job_id, 9)
        assert isinstance(info.value.__cause__, api_exceptions.NotFound)


class TestCreatesDoNotBlockReads:
    @pytest.mark.anyio
    async def test_reads_answer_while_a_create_retries_the_quota(self, cloud: LocalCloud) -> None:
        # One read thread: were creates run on it, the read below would wait for the create.
        jobs = JobsApi(
            make_batch_client(cloud.batch_endpoint),
            cloud.project_id,
            cloud.region,
            anyio.CapacityLimiter(1),
        )
        other = new_job_id()
        await jobs.create(other, script_job("sleep 30"))
        refusals = cloud.stats()["quota_refusals"]
        # The create just made fills a quota of one job per hour: the next one gets 429s.
        cloud.configure(jobs_per_window=1, quota_window_seconds=3600)
        created = anyio.Event()
        stuck = new_job_id()

        async def create_stuck() -> None:
            await jobs.create(stuck, script_job())
            created.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(create_stuck)
                await anyio.wait_all_tasks_blocked()  # the create is in its worker thread
                # Guards against a hang (reads queued behind the create), not a speed limit.
                with anyio.fail_after(120):
                    job = await jobs.get(other)
                    tasks = await jobs.list_tasks(other, fields=TASK_STATE_FIELDS)
                assert job.name == jobs.job_name(other)
                assert len(tasks) == 2
                assert not created.is_set()
                cloud.configure(jobs_per_window=None)
        finally:
            cloud.configure(jobs_per_window=None, quota_window_seconds=60)
        assert (await jobs.get(stuck)).name == jobs.job_name(stuck)
        assert cloud.stats()["quota_refusals"] > refusals
        await jobs.delete(other)


class TestRunDuration:
    """time_limit reaches maxRunDuration exactly (a ":g" string broke 1e6 s and up, issue 12)."""

    @pytest.mark.parametrize(
        ("time_limit", "seconds", "nanos"),
        [
            (1e-9, 0, 1),
            (1e-5, 0, 10_000),
            (0.1, 0, 100_000_000),
            (300, 300, 0),
            (1234567.891, 1234567, 891_000_000),
            (14 * 86400, 1_209_600, 0),
            (315_576_000_000, 315_576_000_000, 0),
        ],
    )
    def test_exact_over_the_range_batch_accepts(
        self, time_limit: float, seconds: int, nanos: int
    ) -> None:
        job = build_job(shape(time_limit=time_limit), task_count=1, job_prefix="p/j", hmac_key="")
        duration = batch_v1.Job.pb(job).task_groups[0].task_spec.max_run_duration
        assert (duration.seconds, duration.nanos) == (seconds, nanos)
        # What the REST transport sends, parsed back as Batch would.
        sent = batch_v1.Job.from_json(batch_v1.Job.to_json(job))
        assert batch_v1.Job.pb(sent).task_groups[0].task_spec.max_run_duration == duration

    @pytest.mark.anyio
    async def test_a_two_week_limit_creates_a_job(self, cloud: LocalCloud) -> None:
        jobs = JobsApi(make_batch_client(cloud.batch_endpoint), cloud.project_id, cloud.region)
        job = build_job(shape(time_limit=14 * 86400), task_count=1, job_prefix="p/j", hmac_key="")
        job.task_groups[0].task_spec.runnables[0] = batch_v1.Runnable(
            script=batch_v1.Runnable.Script(text="true")
        )
        job_id = new_job_id()
        await jobs.create(job_id, job)
        await jobs.delete(job_id)
