"""The Batch RPCs in Google's JSON form, shared by the emulator's front ends (REST and gRPC).

Each method of :class:`BatchRpcs` takes plain values (resource names, filter text, page size and
token) and returns the response message as Google's JSON (camelCase, int64 values as strings,
enums as names); :mod:`.api` (REST) and :mod:`.grpc_api` (gRPC) only translate requests in and
answers out, so both serve the same jobs the same way. :meth:`BatchRpcs.begin` counts every call,
fails it when a fault is planned (``/_emulator/fail_calls``) and parses its response field mask
(see :mod:`covalent_gcpbatch_array.local.field_mask`), for both front ends alike.

Our choices where Google's behaviour is not documented: the page size defaults to 100 and larger
values are clamped to 1000 (ListJobs and ListTasks); ListTasks' ``filter`` accepts state clauses
joined by ``OR`` (``State=RUNNING OR State=FAILED``); ListJobs' ``filter`` and ``orderBy`` are
Google's list syntax (see :mod:`.job_filter`); anything else is refused with 400, never ignored.
A page token is the position in the (filtered, ordered) list.
"""

from __future__ import annotations

import re
from typing import Any

from google.cloud import batch_v1
from google.longrunning import operations_pb2
from google.protobuf.descriptor import Descriptor

from covalent_gcpbatch_array.local.api_errors import ApiError
from covalent_gcpbatch_array.local.batch.scheduler import BatchScheduler
from covalent_gcpbatch_array.local.batch.state import JobRecord, TaskState
from covalent_gcpbatch_array.local.field_mask import FieldMask
from covalent_gcpbatch_array.local.logging.api import TaskLogIndex

__all__ = ["RESPONSE_TYPES", "BatchRpcs"]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

_STATE_CLAUSE = re.compile(r'^\(?\s*(?:status\.)?state\s*=\s*"?([A-Za-z_]+)"?\s*\)?$', re.I)

#: Each RPC's response message, which its field mask is checked against.
RESPONSE_TYPES: dict[str, Descriptor] = {
    "CreateJob": batch_v1.Job.pb().DESCRIPTOR,
    "GetJob": batch_v1.Job.pb().DESCRIPTOR,
    "ListJobs": batch_v1.ListJobsResponse.pb().DESCRIPTOR,
    "DeleteJob": operations_pb2.Operation.DESCRIPTOR,
    "CancelJob": operations_pb2.Operation.DESCRIPTOR,
    "ListTasks": batch_v1.ListTasksResponse.pb().DESCRIPTOR,
    "GetTask": batch_v1.Task.pb().DESCRIPTOR,
    "GetOperation": operations_pb2.Operation.DESCRIPTOR,
}


class BatchRpcs:
    """The Batch RPCs over one scheduler, answered in JSON form.

    :param scheduler: the jobs and their tasks
    :param task_logs: where created jobs are registered for Cloud Logging's ``entries:list``
    """

    def __init__(self, scheduler: BatchScheduler, task_logs: TaskLogIndex) -> None:
        self.scheduler = scheduler
        self.task_logs = task_logs

    def begin(self, method: str, mask_text: str) -> FieldMask | None:
        """Count a call of ``method``, fail it if a fault is planned, and parse its mask.

        A bad mask is refused before the call does anything (a create makes no job).

        :raises ApiError: the planned fault, or 400 for a bad mask
        """
        self.scheduler.stats.api_calls[method] += 1
        planned = self.scheduler.call_faults.take(method)
        if planned is not None:
            raise planned
        return FieldMask.parse(mask_text, RESPONSE_TYPES[method])

    def create_job(
        self, parent: str, job_id: str | None, request_id: str | None, body: bytes
    ) -> dict[str, Any]:
        """CreateJob from the job's JSON definition ``body``."""
        job = self.scheduler.create_job(parent, job_id, request_id, body)
        self.task_logs.add(job)
        return self._job_json(job)

    def get_job(self, name: str) -> dict[str, Any]:
        return self._job_json(self.scheduler.get_job(name))

    def list_jobs(
        self, parent: str, filter_text: str, order_by: str, page_size: int, page_token: str
    ) -> dict[str, Any]:
        size, start = _page(page_size, page_token)
        jobs = self.scheduler.list_jobs(parent, filter_text, order_by)
        body: dict[str, Any] = {"jobs": [self._job_json(job) for job in jobs[start : start + size]]}
        if len(jobs) > start + size:
            body["nextPageToken"] = str(start + size)
        return body

    def _job_json(self, job: JobRecord) -> dict[str, Any]:
        body = job.to_json()
        if not self.scheduler.tasks_listed(job):
            # Tasks that do not exist yet are not counted either: no status.taskGroups.
            del body["status"]["taskGroups"]
        return body

    def delete_job(self, name: str) -> dict[str, Any]:
        return self.scheduler.delete_job(name).to_json()

    def cancel_job(self, name: str) -> dict[str, Any]:
        return self.scheduler.cancel_job(name).to_json()

    def get_operation(self, name: str) -> dict[str, Any]:
        return self.scheduler.get_operation(name).to_json()

    def list_tasks(
        self, job_name: str, group: str, filter_text: str, page_size: int, page_token: str
    ) -> dict[str, Any]:
        job = self.scheduler.task_group(job_name, group)
        states = _state_filter(filter_text)
        size, start = _page(page_size, page_token)
        if not self.scheduler.tasks_listed(job):
            return {"tasks": []}
        page: list[dict[str, Any]] = []
        index = start
        # Scan from the token's index until the page is full: O(page) without a filter.
        while index < len(job.tasks) and len(page) < size:
            task = job.tasks[index]
            if states is None or task.state in states:
                page.append(job.task_json(task))
            index += 1
        if states is not None:
            while index < len(job.tasks) and job.tasks[index].state not in states:
                index += 1
        body: dict[str, Any] = {"tasks": page}
        if index < len(job.tasks):
            body["nextPageToken"] = str(index)
        return body

    def get_task(self, job_name: str, group: str, task_id: str) -> dict[str, Any]:
        job, task = self.scheduler.get_task(job_name, group, task_id)
        return job.task_json(task)


def _page(size: int, token: str) -> tuple[int, int]:
    """(page size, start position) from a request's page size and page token."""
    if size < 0:
        raise ApiError.invalid_argument("page_size", f"must be an integer >= 0, got {size}")
    if token and not token.isdigit():
        raise ApiError.invalid_argument(
            "page_token", f"{token!r} is not a page token this emulator handed out"
        )
    return min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE), int(token or 0)


def _state_filter(text: str) -> frozenset[TaskState] | None:
    """The states a ``filter`` such as ``State=RUNNING OR State=FAILED`` selects (None: all)."""
    if not text.strip():
        return None
    selected = set()
    for clause in re.split(r"\s+OR\s+", text.strip()):
        match = _STATE_CLAUSE.match(clause.strip())
        if match is None:
            raise ApiError.invalid_argument(
                "filter",
                f"unsupported filter {text!r}: the emulator understands state clauses joined by "
                f"OR, e.g. 'State=RUNNING OR State=FAILED'",
            )
        name = match.group(1).upper()
        if name not in TaskState.__members__:
            raise ApiError.invalid_argument(
                "filter", f"unknown state {name!r}; use one of {', '.join(TaskState.__members__)}"
            )
        selected.add(TaskState[name])
    return frozenset(selected)
