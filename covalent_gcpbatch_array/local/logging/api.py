"""Cloud Logging's ``entries:list`` in the Batch emulator: each task's output as Batch logs it.

A Batch job whose ``logsPolicy.destination`` is ``CLOUD_LOGGING`` sends every line its
runnables print to the log ``projects/P/logs/batch_task_logs``. The emulator serves those lines
from the files its task attempts wrote, at the REST path google-cloud-logging's HTTP client
uses (``POST /v2/entries:list``, see ``google/cloud/logging_v2/_http.py``), so
``logging_v2.Client(...).list_entries(filter_=...)`` works against the local cloud unchanged.

Each line becomes one LogEntry shaped like Batch's, with the labels Batch documents for task
logs (the entry's ``labels.job_uid``, ``labels.task_group_name`` and ``labels.task_id``, which
the CLI and Nextflow's Google Batch executor filter on, plus the job's own labels)::

    {"logName": "projects/P/logs/batch_task_logs",
     "resource": {"type": "batch.googleapis.com/Job",
                  "labels": {"resource_container": P, "location": L, "job_id": <uid>}},
     "labels": {<the job's own labels>, "job_uid": <uid>,
                "task_group_name": "projects/P/locations/L/jobs/J/taskGroups/group0",
                "task_id": "<uid>-group0-<index>"},
     "severity": "INFO" (stdout) or "ERROR" (stderr), "textPayload": <the line>,
     "timestamp": ..., "receiveTimestamp": ..., "insertId": ...}

Jobs that Batch logged before it moved to the ``batch.googleapis.com/Job`` resource carry the
older ``generic_task`` resource instead (``TaskLogIndex(resource_type=GENERIC_TASK)``, the server's
``--log-resource-type generic_task``, ``LocalCloud(log_resource_type="generic_task")``), whose
labels are ``project_id``, ``location``, ``namespace``, ``job`` (the uid) and ``task_id``
(``task/<uid>-group0-<index>/0/0``).

Checked 2026-12-03: the log names ``batch_task_logs`` (and ``batch_agent_logs``) and
``logsPolicy.destination = CLOUD_LOGGING`` against
https://cloud.google.com/batch/docs/analyze-job-using-logs; the ``labels.task_id`` value
``<job uid>-group0-<index>`` against GoogleCloudPlatform/batch-samples issue 85. The other entry
labels and both resources' label sets come from public code samples only (Google's monitored
resource list could not be read here): unconfirmed.

Where the emulator differs: ``location`` is the job's region (Google writes the VM's zone), every line of one stream of one attempt carries the time its file
was last written (the files keep no per-line times), and logs never expire. Logs outlive their
job, as on Google: a deleted job's lines are still listed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from covalent_gcpbatch_array.local.api_errors import ApiError, error_response, json_object
from covalent_gcpbatch_array.local.batch.state import JobRecord, rfc3339
from covalent_gcpbatch_array.local.logging.query import FilterError, parse_filter
from covalent_gcpbatch_array.local.logging.resources import (
    JOB_RESOURCE,
    RESOURCE_TYPES,
    monitored_resource,
)

__all__ = ["BATCH_TASK_LOG", "REQUEST_FIELDS", "TaskLogIndex", "logging_routes"]

#: The log Batch writes task output to (``projects/{project}/logs/{BATCH_TASK_LOG}``).
BATCH_TASK_LOG = "batch_task_logs"
DEFAULT_PAGE_SIZE = 50  # Cloud Logging's documented default
MAX_PAGE_SIZE = 1000  # and its maximum
_STREAM_SEVERITY = {"stdout": "INFO", "stderr": "ERROR"}
_ORDERS = {"": False, "timestamp asc": False, "timestamp desc": True}
#: ListLogEntriesRequest's fields (the Logging v2 discovery document's, checked by a test);
#: Google refuses any other name in the body with 400, and so does the emulator.
REQUEST_FIELDS = frozenset(
    {"resourceNames", "projectIds", "filter", "orderBy", "pageSize", "pageToken"}
)


@dataclass(frozen=True)
class _LoggedJob:
    """What the index remembers of a job whose tasks log to Cloud Logging."""

    project: str  # the project id in the job's name
    location: str  # the job's region
    job_id: str  # the job id the client chose
    uid: str  # Batch's unique id of this job (ids may be reused after a delete)
    labels: Mapping[str, str]  # the job's labels, which Batch copies onto its log entries
    output_dir: Path  # the folder the emulator keeps this job's attempt outputs in
    resource_type: str  # one of RESOURCE_TYPES


class TaskLogIndex:
    """The jobs whose output the emulator serves as Cloud Logging entries.

    The Batch API layer calls :meth:`add` for every job it creates; jobs without
    ``logsPolicy.destination = CLOUD_LOGGING`` are ignored, as Batch writes no task logs for
    them. Jobs stay listed after they are deleted.

    :param resource_type: the monitored resource its entries carry
    """

    def __init__(self, resource_type: str = JOB_RESOURCE) -> None:
        if resource_type not in RESOURCE_TYPES:
            raise ValueError(
                f"resource_type must be one of {RESOURCE_TYPES}, got {resource_type!r}"
            )
        self._resource_type = resource_type
        self._jobs: dict[str, _LoggedJob] = {}  # by uid, in creation order
        # Each output file's entries, with the (mtime, size) they were read at: a query, and
        # every page of it, rereads only the files that changed.
        self._files: dict[Path, tuple[tuple[int, int], list[dict[str, Any]]]] = {}
        # The HTTP layer runs on one event loop, but reads of the files run in worker threads.
        self._lock = threading.Lock()

    def add(self, job: JobRecord) -> None:
        """Remember ``job`` if it logs to Cloud Logging (a repeated add is a no-op)."""
        destination = job.spec.echo.get("logsPolicy", {}).get("destination")
        if destination not in ("CLOUD_LOGGING", 1):
            return
        parts = job.name.split("/")  # projects/P/locations/L/jobs/J
        labels = job.spec.echo.get("labels", {})
        with self._lock:
            self._jobs.setdefault(
                job.uid,
                _LoggedJob(
                    project=parts[1],
                    location=parts[3],
                    job_id=job.job_id,
                    uid=job.uid,
                    labels=dict(labels) if isinstance(labels, Mapping) else {},
                    output_dir=job.output_dir,
                    resource_type=self._resource_type,
                ),
            )

    def entries(self, projects: Sequence[str]) -> list[dict[str, Any]]:
        """Every entry of the jobs in ``projects``, oldest first (ties in output order)."""
        with self._lock:
            jobs = [job for job in self._jobs.values() if job.project in projects]
        found = [entry for job in jobs for entry in self._job_entries(job)]
        # A stable sort: entries with equal times keep their job, task, attempt, line order.
        found.sort(key=lambda entry: entry["timestamp"])
        return found

    def _job_entries(self, job: _LoggedJob) -> Iterator[dict[str, Any]]:
        """The entries of one job: its tasks' attempts' output files, line by line."""
        tasks = job.output_dir / "tasks"
        if not tasks.is_dir():
            return
        for task_dir in sorted(_numbered(tasks), key=lambda path: int(path.name)):
            for attempt_dir in sorted(_numbered(task_dir), key=lambda path: int(path.name)):
                for stream, severity in _STREAM_SEVERITY.items():
                    for path in sorted(attempt_dir.glob(f"*.{stream}"), key=_runnable_number):
                        place = (int(task_dir.name), int(attempt_dir.name))
                        yield from self._file_entries(job, place, path, severity)

    def _file_entries(
        self, job: _LoggedJob, place: tuple[int, int], path: Path, severity: str
    ) -> list[dict[str, Any]]:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return []
        version = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._files.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        entries = list(_line_entries(job, place, path.name, stat.st_mtime, text, severity))
        with self._lock:
            self._files[path] = (version, entries)
        return entries


def _numbered(folder: Path) -> Iterator[Path]:
    return (path for path in folder.iterdir() if path.is_dir() and path.name.isdigit())


def _runnable_number(path: Path) -> int:
    head = path.name.split(".")[0]
    return int(head) if head.isdigit() else 0


def _line_entries(
    job: _LoggedJob,
    place: tuple[int, int],
    file_name: str,
    mtime: float,
    text: str,
    severity: str,
) -> Iterator[dict[str, Any]]:
    """One entry per line of one output file of attempt ``place = (index, attempt)``."""
    index, attempt = place
    written = rfc3339(datetime.fromtimestamp(mtime, timezone.utc))
    task_id = f"{job.uid}-group0-{index}"
    resource = monitored_resource(job.resource_type, job.project, job.location, job.uid, task_id)
    labels = {
        **job.labels,
        "job_uid": job.uid,
        "task_group_name": (
            f"projects/{job.project}/locations/{job.location}/jobs/{job.job_id}/taskGroups/group0"
        ),
        "task_id": task_id,
    }
    for number, line in enumerate(text.splitlines()):
        yield {
            "logName": f"projects/{job.project}/logs/{BATCH_TASK_LOG}",
            "resource": resource,
            "labels": labels,
            "severity": severity,
            "textPayload": line,
            "timestamp": written,
            "receiveTimestamp": written,
            # Unique and stable across calls, so page tokens stay valid as files grow.
            "insertId": f"{task_id}/{attempt}/{file_name}/{number:09d}",
        }


def logging_routes(index: TaskLogIndex) -> list[Route]:
    """The Logging API routes, to add to the emulator's Starlette app."""

    async def list_entries(request: Request) -> Response:
        try:
            body = await json_object(request, "ListLogEntriesRequest")
            if unknown := sorted(set(body) - REQUEST_FIELDS):
                raise ApiError(400, f"Invalid JSON payload received. Unknown name {unknown[0]!r}")
            if "projectIds" in body:
                raise ApiError.invalid_argument(
                    "project_ids", "is not supported by the local cloud: use resourceNames"
                )
            projects = _projects(body.get("resourceNames"))
            predicate = parse_filter(_string(body, "filter"))
            descending = _order(_string(body, "orderBy"))
            size, start = _page(body)
        except FilterError as exc:
            return error_response(ApiError.invalid_argument("filter", f"Unparseable filter: {exc}"))
        except ApiError as exc:
            return error_response(exc)
        # Reading the files blocks: keep the emulator's event loop free meanwhile.
        entries = await anyio.to_thread.run_sync(index.entries, projects)
        selected = [entry for entry in entries if predicate(entry)]
        if descending:
            selected.reverse()
        page = selected[start : start + size]
        answer: dict[str, Any] = {"entries": page} if page else {}
        if start + size < len(selected):
            answer["nextPageToken"] = str(start + size)
        return JSONResponse(answer)

    return [Route("/v2/entries:list", list_entries, methods=["POST"])]


def _string(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise ApiError.invalid_argument(key, f"must be a string, got {value!r}")
    return value


def _projects(names: Any) -> list[str]:
    if not isinstance(names, list) or not names:
        raise ApiError.invalid_argument(
            "resource_names", 'give at least one parent, e.g. ["projects/my-project"]'
        )
    projects = []
    for name in names:
        parts = name.split("/") if isinstance(name, str) else []
        if len(parts) != 2 or parts[0] != "projects" or not parts[1]:
            raise ApiError.invalid_argument(
                "resource_names",
                f"{name!r}: the emulator serves project logs only, as 'projects/PROJECT_ID'",
            )
        projects.append(parts[1])
    return projects


def _order(order_by: str) -> bool:
    key = " ".join(order_by.lower().split())
    if key not in _ORDERS:
        raise ApiError.invalid_argument(
            "order_by", f"{order_by!r}: use 'timestamp asc' or 'timestamp desc'"
        )
    return _ORDERS[key]


def _page(body: Mapping[str, Any]) -> tuple[int, int]:
    """(page size, start offset) from ``pageSize`` (int or string) and ``pageToken``."""
    size_value = body.get("pageSize", 0)
    try:
        size = int(size_value)
    except (TypeError, ValueError):
        raise ApiError.invalid_argument("page_size", f"{size_value!r} is not a number") from None
    if size < 0:
        raise ApiError.invalid_argument("page_size", f"must be >= 0, got {size}")
    token = _string(body, "pageToken")
    if token and not token.isdigit():
        raise ApiError.invalid_argument("page_token", f"{token!r} was not issued by the emulator")
    return min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE), int(token or 0)
