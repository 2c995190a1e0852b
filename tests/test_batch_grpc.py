"""The Batch emulator over gRPC, Google's default transport, through the real clients.

``BatchServiceAsyncClient`` (gRPC only) and ``BatchServiceClient`` on its default gRPC transport
drive LocalCloud with only its ``batch_grpc_endpoint`` and an insecure channel: jobs are created,
read, listed, cancelled and deleted, their tasks really run, the same jobs are seen over REST,
and refusals carry the gRPC status codes (and ``google.rpc`` details) Google's front end gives.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import grpc
import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1
from google.protobuf import json_format

from covalent_gcpbatch_array._core.jobs import TASK_STATE_FIELDS
from covalent_gcpbatch_array.local import LocalCloud
from covalent_gcpbatch_array.local.batch.grpc_api import _ListConverter
from tests.polling import job_reached

JobState = batch_v1.JobStatus.State
TaskState = batch_v1.TaskStatus.State
FINAL = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
MASK = ("x-goog-fieldmask", ",".join(TASK_STATE_FIELDS))
PARENT_OF_TASKS = "projects/p/locations/us-east1/jobs/j/taskGroups/group0/tasks"


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud(preload=()) as running:
        running.configure(deletion_delay=0.5, cancellation_delay=0.5)
        yield running


@pytest.fixture(scope="module")
def client(cloud: LocalCloud) -> Iterator[batch_v1.BatchServiceClient]:
    with cloud.batch_grpc_client() as grpc_client:
        yield grpc_client


def parent(cloud: LocalCloud) -> str:
    return f"projects/{cloud.project_id}/locations/{cloud.region}"


def script_job(text: str, task_count: int = 1) -> batch_v1.Job:
    spec = batch_v1.TaskSpec(runnables=[batch_v1.Runnable(script={"text": text})])
    group = batch_v1.TaskGroup(task_spec=spec, task_count=task_count)
    return batch_v1.Job(task_groups=[group], labels={"suite": "grpc"})


def new_id() -> str:
    return f"g-{uuid.uuid4().hex[:12]}"


async def reached(
    client: batch_v1.BatchServiceAsyncClient, name: str, states: tuple[Any, ...] = FINAL
) -> batch_v1.Job:
    with anyio.fail_after(60):
        while True:
            job = await client.get_job(name=name)
            if job.status.state in states:
                return job
            await anyio.sleep(0.05)  # polling the remote state, as the executor does


class TestAsyncClient:
    @pytest.mark.anyio
    async def test_creates_gets_lists_and_deletes_a_job_whose_tasks_run(
        self, cloud: LocalCloud
    ) -> None:
        async with cloud.batch_grpc_async_client() as client:
            job_id = new_id()
            created = await client.create_job(
                parent=parent(cloud),
                job_id=job_id,
                job=script_job("echo task $BATCH_TASK_INDEX", 3),
            )
            assert created.name == f"{parent(cloud)}/jobs/{job_id}"
            assert created.uid and created.labels["batch-job-id"] == job_id
            assert created.task_groups[0].task_count == 3

            done = await reached(client, created.name)
            assert done.status.state == JobState.SUCCEEDED
            request = {"parent": parent(cloud), "filter": f'name="{created.name}"'}
            pager = await client.list_jobs(request=request)
            assert [job.name async for job in pager] == [created.name]
            tasks = await client.list_tasks(parent=f"{created.name}/taskGroups/group0")
            listed = [task async for task in tasks]
            assert [task.status.state for task in listed] == [TaskState.SUCCEEDED] * 3
            one = await client.get_task(name=listed[2].name)
            assert one.name.endswith("/tasks/2") and one.status.status_events
            for index in range(3):
                output = await anyio.to_thread.run_sync(cloud.task_output, job_id, index)
                assert output == f"task {index}\n"

            operation = await client.delete_job(name=created.name)
            assert (await client.get_job(name=created.name)).status.state == (
                JobState.DELETION_IN_PROGRESS
            )
            await operation.result(timeout=30)
            assert operation.metadata.verb == "delete"
            with pytest.raises(api_exceptions.NotFound, match=job_id):
                await client.get_job(name=created.name)

    @pytest.mark.anyio
    async def test_cancels_a_running_job_and_keeps_it(self, cloud: LocalCloud) -> None:
        async with cloud.batch_grpc_async_client() as client:
            job = await client.create_job(
                parent=parent(cloud), job_id=new_id(), job=script_job("sleep 60", 2)
            )
            await reached(client, job.name, (JobState.RUNNING,))
            operation = await client.cancel_job(name=job.name)
            assert (await client.get_job(name=job.name)).status.state == (
                JobState.CANCELLATION_IN_PROGRESS
            )
            response = await operation.result(timeout=30)
            assert isinstance(response, batch_v1.CancelJobResponse)
            assert (await client.get_job(name=job.name)).status.state == JobState.CANCELLED
            tasks = await client.list_tasks(parent=f"{job.name}/taskGroups/group0")
            assert {task.status.state async for task in tasks} == {TaskState.FAILED}


class TestSyncClient:
    def test_default_grpc_transport_runs_a_job(
        self, cloud: LocalCloud, client: batch_v1.BatchServiceClient
    ) -> None:
        assert client.transport.kind == "grpc"
        job = client.create_job(parent=parent(cloud), job_id=new_id(), job=script_job("true", 2))
        assert job_reached(client, job.name).status.state == JobState.SUCCEEDED
        pages = client.list_tasks(
            request={"parent": f"{job.name}/taskGroups/group0", "page_size": 1}
        ).pages
        assert [[task.name.rsplit("/", 1)[1] for task in page.tasks] for page in pages] == [
            ["0"],
            ["1"],
        ]
        client.delete_job(name=job.name).result(timeout=30)

    def test_jobs_are_shared_with_the_rest_side(
        self, cloud: LocalCloud, client: batch_v1.BatchServiceClient
    ) -> None:
        rest = cloud.batch_client()
        over_grpc = client.create_job(parent=parent(cloud), job_id=new_id(), job=script_job("true"))
        over_rest = rest.create_job(parent=parent(cloud), job_id=new_id(), job=script_job("true"))
        assert rest.get_job(name=over_grpc.name).uid == over_grpc.uid
        assert client.get_job(name=over_rest.name).uid == over_rest.uid
        assert job_reached(client, over_rest.name).status.state == JobState.SUCCEEDED
        rest.delete_job(name=over_grpc.name).result(timeout=30)
        with pytest.raises(api_exceptions.NotFound):
            client.get_job(name=over_grpc.name)

    def test_field_mask_metadata_trims_the_answer(
        self, cloud: LocalCloud, client: batch_v1.BatchServiceClient
    ) -> None:
        job = client.create_job(parent=parent(cloud), job_id=new_id(), job=script_job("true", 2))
        job_reached(client, job.name)
        request = {"parent": f"{job.name}/taskGroups/group0"}
        masked = list(client.list_tasks(request=request, metadata=[MASK]))
        assert [task.status.state for task in masked] == [TaskState.SUCCEEDED] * 2
        assert not any(task.status.status_events for task in masked)
        assert all(task.status.status_events for task in client.list_tasks(request=request))
        with pytest.raises(api_exceptions.InvalidArgument, match="no_such_field"):
            list(client.list_tasks(request=request, metadata=[(MASK[0], "tasks.no_such_field")]))


class TestDocumentedBehaviourOverGrpc:
    """What test_batch_contract checks over REST holds over gRPC: the same state, the same rules."""

    def test_a_machine_type_google_lacks_fails_naming_the_field(
        self, cloud: LocalCloud, client: batch_v1.BatchServiceClient
    ) -> None:
        job = script_job("true")
        job.allocation_policy = batch_v1.AllocationPolicy(
            instances=[{"policy": {"machine_type": "n9-standard-4"}}]
        )
        created = client.create_job(parent=parent(cloud), job_id=new_id(), job=job)
        done = job_reached(client, created.name)
        assert done.status.state == JobState.FAILED
        assert "policy.machine_type" in done.status.status_events[-1].description

    @pytest.mark.parametrize(
        ("field", "value"), [("labels", {"goog-x": "1"}), ("priority", 100)], ids=str
    )
    def test_reserved_labels_and_priority_out_of_range_are_invalid(
        self, cloud: LocalCloud, client: batch_v1.BatchServiceClient, field: str, value: Any
    ) -> None:
        job = script_job("true")
        setattr(job, field, value)
        with pytest.raises(api_exceptions.InvalidArgument):
            client.create_job(parent=parent(cloud), job_id=new_id(), job=job)

    def test_list_jobs_filters_orders_and_pages(
        self, cloud: LocalCloud, client: batch_v1.BatchServiceClient
    ) -> None:
        mark = uuid.uuid4().hex[:8]
        names = []
        for _ in range(3):
            job = script_job("true")
            job.labels = {"mark": mark}
            names.append(client.create_job(parent=parent(cloud), job_id=new_id(), job=job).name)
        request = {
            "parent": parent(cloud),
            "filter": f'labels.mark="{mark}"',
            "order_by": "create_time desc",
            "page_size": 2,
        }
        pages = [[job.name for job in page.jobs] for page in client.list_jobs(request).pages]
        assert pages == [names[:0:-1], names[:1]]
        with pytest.raises(api_exceptions.InvalidArgument):
            list(client.list_jobs(request={"parent": parent(cloud), "order_by": "uid"}))


class TestErrors:
    """Refusals carry the gRPC code Google gives, and its details."""

    def test_not_found_invalid_argument_and_already_exists(
        self, cloud: LocalCloud, client: batch_v1.BatchServiceClient
    ) -> None:
        with pytest.raises(api_exceptions.NotFound) as missing:
            client.get_job(name=f"{parent(cloud)}/jobs/no-such-job")
        assert missing.value.grpc_status_code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(api_exceptions.InvalidArgument) as bad:
            client.create_job(parent=parent(cloud), job_id="Bad_Id", job=script_job("true"))
        violations = [v for detail in bad.value.details for v in detail.field_violations]
        assert [violation.field for violation in violations] == ["job_id"]
        job_id = new_id()
        client.create_job(parent=parent(cloud), job_id=job_id, job=script_job("true"))
        with pytest.raises(api_exceptions.AlreadyExists, match=job_id):
            client.create_job(parent=parent(cloud), job_id=job_id, job=script_job("true"))

    def test_the_job_creation_quota_is_resource_exhausted(
        self, cloud: LocalCloud, client: batch_v1.BatchServiceClient
    ) -> None:
        before = cloud.settings()
        cloud.configure(jobs_per_window=1, quota_window_seconds=600)
        try:
            with pytest.raises(api_exceptions.ResourceExhausted) as refused:
                for _ in range(2):  # the first create may already be one too many
                    client.create_job(parent=parent(cloud), job_id=new_id(), job=script_job("true"))
        finally:
            cloud.configure(
                jobs_per_window=before["jobs_per_window"],
                quota_window_seconds=before["quota_window_seconds"],
            )
        assert refused.value.reason == "RATE_LIMIT_EXCEEDED"
        assert refused.value.grpc_status_code == grpc.StatusCode.RESOURCE_EXHAUSTED

    @pytest.mark.parametrize(
        "call",
        [
            lambda c, p: c.list_locations(request={"name": p.rsplit("/locations", 1)[0]}),
            lambda c, p: c.list_operations(request={"name": p}),
            lambda c, p: c.cancel_operation(request={"name": f"{p}/operations/x"}),
            lambda c, p: c.delete_operation(request={"name": f"{p}/operations/x"}),
        ],
        ids=["ListLocations", "ListOperations", "CancelOperation", "DeleteOperation"],
    )
    def test_what_rest_answers_501_is_unimplemented(
        self, cloud: LocalCloud, client: batch_v1.BatchServiceClient, call: Any
    ) -> None:
        with pytest.raises(api_exceptions.MethodNotImplemented, match="not supported by the local"):
            call(client, parent(cloud))

    def test_planned_faults_and_stats_count_grpc_calls(
        self, cloud: LocalCloud, client: batch_v1.BatchServiceClient
    ) -> None:
        before = cloud.stats()["api_calls"]["GetJob"]
        cloud.fail_calls("GetJob", status=503, count=1)
        with pytest.raises(api_exceptions.ServiceUnavailable, match="Injected fault"):
            client.get_job(name=f"{parent(cloud)}/jobs/any", retry=None)
        with pytest.raises(api_exceptions.NotFound):
            client.get_job(name=f"{parent(cloud)}/jobs/any", retry=None)
        assert cloud.stats()["api_calls"]["GetJob"] == before + 2


class TestListConversion:
    """A list answer's elements are converted once per content, to the same message."""

    @staticmethod
    def answer(*states: str) -> dict[str, Any]:
        tasks = [
            {"name": f"{PARENT_OF_TASKS}/{index}", "status": {"state": state}}
            for index, state in enumerate(states)
        ]
        return {"tasks": tasks, "nextPageToken": "2"}

    def test_the_message_is_what_parse_dict_makes(self) -> None:
        convert = _ListConverter(batch_v1.ListTasksResponse.pb(), "tasks", batch_v1.Task.pb())
        for answer in (self.answer("RUNNING", "PENDING"), self.answer("SUCCEEDED", "PENDING")):
            expected = json_format.ParseDict(answer, batch_v1.ListTasksResponse.pb()())
            assert convert(answer) == expected  # the second: one task changed, one seen before
            assert convert(answer) == expected  # every element seen before
        assert convert({}) == batch_v1.ListTasksResponse.pb()()

    def test_a_converted_element_is_not_changed_by_its_response(self) -> None:
        convert = _ListConverter(batch_v1.ListTasksResponse.pb(), "tasks", batch_v1.Task.pb())
        first = convert(self.answer("SUCCEEDED"))
        first.tasks[0].status.state = int(batch_v1.TaskStatus.State.FAILED)
        assert convert(self.answer("SUCCEEDED")).tasks[0].status.state == (
            batch_v1.TaskStatus.State.SUCCEEDED
        )
