"""The poll's task listing as plain JSON (``JobsApi.task_states``), against the local cloud."""

from __future__ import annotations

import functools
from typing import Any

import anyio
import pytest
import requests
from google.api_core import exceptions as api_exceptions
from google.cloud import batch_v1
from google.protobuf import json_format

from covalent_gcpbatch_array._core import jobs as batch
from covalent_gcpbatch_array._core.clients import make_batch_client
from covalent_gcpbatch_array._core.jobs import JobsApi, new_job_id
from covalent_gcpbatch_array._core.task_states import TaskStateReader
from covalent_gcpbatch_array.exceptions import BatchApiError
from covalent_gcpbatch_array.local import LocalCloud
from covalent_gcpbatch_array.local.gcs.proxy import serve
from tests.test_jobs import script_job, wait_job_state

FINISHED = ("SUCCEEDED", "FAILED")


def jobs_api(endpoint: str, cloud: LocalCloud) -> JobsApi:
    return JobsApi(make_batch_client(endpoint), cloud.project_id, cloud.region)


async def finished_job(jobs: JobsApi, tasks: int, failing: int | None = None) -> str:
    """A job of ``tasks`` script tasks, once it ended; task ``failing`` exits with 7."""
    command = f'[ "$BATCH_TASK_INDEX" = {failing} ] && exit 7; exit 0'
    job_id = new_job_id()
    await jobs.create(job_id, script_job(command, tasks))
    ended = (
        batch_v1.JobStatus.State.SUCCEEDED if failing is None else batch_v1.JobStatus.State.FAILED
    )
    await wait_job_state(jobs, job_id, ended)
    return job_id


@pytest.fixture
def jobs(local_cloud: LocalCloud) -> JobsApi:
    return jobs_api(local_cloud.batch_endpoint, local_cloud)


def refuse_protobuf(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, a response parsed into protobuf (the client's REST path) fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a task listing was parsed into protobuf")

    monkeypatch.setattr(json_format, "Parse", refuse)


def calls(cloud: LocalCloud) -> int:
    count: int = cloud.stats()["api_calls"]["ListTasks"]
    return count


class TestTaskStates:
    @pytest.mark.anyio
    async def test_states_by_index_and_the_filter(
        self, jobs: JobsApi, local_cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        job_id = await finished_job(jobs, 3, failing=1)
        refuse_protobuf(monkeypatch)  # the point of this path, and where the client's spends
        assert await jobs.task_states(job_id, FINISHED) == {
            0: "SUCCEEDED",
            1: "FAILED",
            2: "SUCCEEDED",
        }
        assert await jobs.task_states(job_id, ("FAILED",)) == {1: "FAILED"}
        assert await jobs.task_states(job_id, ("RUNNING",)) == {}
        assert len(await jobs.task_states(job_id)) == 3

    @pytest.mark.anyio
    async def test_pages_across_more_tasks_than_a_page(
        self, jobs: JobsApi, local_cloud: LocalCloud, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        job_id = await finished_job(jobs, 5, failing=3)
        monkeypatch.setattr(batch, "TASK_PAGE_SIZE", 2)
        before = calls(local_cloud)
        assert await jobs.task_states(job_id) == dict.fromkeys([0, 1, 2, 4], "SUCCEEDED") | {
            3: "FAILED"
        }
        assert calls(local_cloud) - before == 3
        # A filtered listing pages too: a page holds the matching tasks only.
        assert await jobs.task_states(job_id, ("SUCCEEDED",)) == dict.fromkeys(
            [0, 1, 2, 4], "SUCCEEDED"
        )
        assert calls(local_cloud) - before == 3 + 2

    @pytest.mark.anyio
    async def test_the_field_mask_is_sent(
        self, jobs: JobsApi, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        job_id = await finished_job(jobs, 1)
        # The emulator checks every masked path, as Batch does: a wrong one must reach it.
        fields = (*batch.TASK_STATE_FIELDS, "tasks.status.no_such_field")
        monkeypatch.setattr(batch, "TASK_STATE_FIELDS", fields)
        with pytest.raises(BatchApiError, match=r"no_such_field") as info:
            await jobs.task_states(job_id)
        assert isinstance(info.value.__cause__, api_exceptions.BadRequest)

    @pytest.mark.anyio
    async def test_the_mask_leaves_out_status_events(
        self, jobs: JobsApi, local_cloud: LocalCloud
    ) -> None:
        job_id = await finished_job(jobs, 2)
        reader = TaskStateReader.of(make_batch_client(local_cloud.batch_endpoint))
        mask = ",".join(batch.TASK_STATE_FIELDS)
        answer = reader.session.get(
            f"{reader.host}/v1/{jobs.job_name(job_id)}/taskGroups/group0/tasks",
            headers={"X-Goog-FieldMask": mask},
            timeout=30,
        )
        answer.raise_for_status()
        assert {key for task in answer.json()["tasks"] for key in task} == {"name", "status"}
        assert all(task["status"] == {"state": "SUCCEEDED"} for task in answer.json()["tasks"])


class TestFaults:
    @pytest.mark.anyio
    @pytest.mark.parametrize("status", [429, 503])
    async def test_a_transient_error_is_retried(
        self, jobs: JobsApi, local_cloud: LocalCloud, status: int
    ) -> None:
        job_id = await finished_job(jobs, 2)
        before = calls(local_cloud)
        local_cloud.fail_calls("ListTasks", status, 2)
        assert await jobs.task_states(job_id, FINISHED) == {0: "SUCCEEDED", 1: "SUCCEEDED"}
        assert calls(local_cloud) - before == 3

    @pytest.mark.anyio
    @pytest.mark.parametrize(
        ("status", "cause", "advice"),
        [
            (400, api_exceptions.BadRequest, ""),
            (403, api_exceptions.Forbidden, "roles/batch.jobsEditor"),
        ],
    )
    async def test_a_refusal_is_a_batch_api_error_naming_the_job(
        self,
        jobs: JobsApi,
        local_cloud: LocalCloud,
        status: int,
        cause: type[Exception],
        advice: str,
    ) -> None:
        job_id = await finished_job(jobs, 1)
        before = calls(local_cloud)
        local_cloud.fail_calls("ListTasks", status, 1)
        with pytest.raises(BatchApiError, match=f"listing tasks of job {job_id} failed") as info:
            await jobs.task_states(job_id)
        assert isinstance(info.value.__cause__, cause)
        assert advice in str(info.value)
        assert calls(local_cloud) - before == 1  # not retried

    @pytest.mark.anyio
    async def test_a_missing_job_is_not_found(self, jobs: JobsApi) -> None:
        with pytest.raises(BatchApiError, match="listing tasks of job cga-missing") as info:
            await jobs.task_states("cga-missing")
        assert isinstance(info.value.__cause__, api_exceptions.NotFound)

    @pytest.mark.anyio
    async def test_a_dropped_connection_is_retried(self, local_cloud: LocalCloud) -> None:
        async with anyio.create_task_group() as tg:
            # The fault proxy (plain HTTP) in front of the Batch emulator resets connections.
            endpoint = await tg.start(serve, local_cloud.batch_endpoint)
            jobs = jobs_api(endpoint, local_cloud)
            job_id = await finished_job(jobs, 2)
            plan: dict[str, Any] = {"method": "GET", "path": "/tasks?", "drop": True, "count": 2}
            post = functools.partial(requests.post, json=plan, timeout=10)
            (await anyio.to_thread.run_sync(post, f"{endpoint}/_proxy/faults")).raise_for_status()
            states = await jobs.task_states(job_id, FINISHED)
            get = functools.partial(requests.get, timeout=10)
            stats = (await anyio.to_thread.run_sync(get, f"{endpoint}/_proxy/stats")).json()
            tg.cancel_scope.cancel()
        assert states == {0: "SUCCEEDED", 1: "SUCCEEDED"}
        assert stats["dropped"] == 2 and stats["pending"] == 0
