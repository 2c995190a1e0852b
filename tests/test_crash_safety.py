"""Crash safety (issue 12): what the executor leaves behind when it, or its job-mates, go wrong.

Every test runs the real executor against a LocalCloud of its module, through the real Google
clients; nothing is mocked. Where a race has to be made to happen, a real call is answered
late, never faked.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import cloudpickle
import pytest
from covalent._shared_files.exceptions import TaskCancelledError
from electrons import executor_for

from covalent_gcpbatch_array._core.contract import TaskRef
from covalent_gcpbatch_array._core.jobs import TASK_STATE_FIELDS, JobsApi
from covalent_gcpbatch_array._core.runtime import ExecutorRuntime
from covalent_gcpbatch_array._core.storage import TaskObject, TaskStore
from covalent_gcpbatch_array.local import LocalCloud

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
