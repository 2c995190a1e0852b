"""Operating the executor's jobs: what ran where, its logs, and cleaning up.

:class:`Inspector` answers the questions behind ``gcpbatch-array jobs | tasks | logs | gc``
through the same clients the executor uses (google-cloud-batch, google-cloud-storage) plus
google-cloud-logging, so it works against Google and the local cloud alike. It returns plain
dataclasses; :mod:`covalent_gcpbatch_array.cli.jobs` renders them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from google.api_core import exceptions as api_exceptions

from covalent_gcpbatch_array._core.contract import (
    ENV_HMAC_KEY,
    ENV_ORPHAN_TIMEOUT,
    JOB_ID_PATTERN,
    TaskRef,
)
from covalent_gcpbatch_array._core.envelopes import decode_error, parse_job_key
from covalent_gcpbatch_array._core.jobs import FLUSH_REASON_LABEL, JobsApi
from covalent_gcpbatch_array._core.outcome import task_exit_code, task_index
from covalent_gcpbatch_array._core.storage import TaskObject, TaskStore
from covalent_gcpbatch_array.exceptions import CloudApiError, GCPBatchArrayError

if TYPE_CHECKING:
    import google.cloud.storage as storage
    from google.cloud import batch_v1, logging_v2

__all__ = [
    "FINISHED_JOB_STATES",
    "GcReport",
    "Inspector",
    "JobSummary",
    "TaskLogs",
    "TaskSummary",
    "parse_duration",
]

#: Job states after which nothing runs any more: safe to delete.
FINISHED_JOB_STATES = frozenset({"SUCCEEDED", "FAILED"})
#: Job states that may still start or run tasks: gc ends them once their executor is gone.
UNFINISHED_JOB_STATES = frozenset({"QUEUED", "SCHEDULED", "RUNNING"})
#: The log Batch writes task output to.
TASK_LOG = "batch_task_logs"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """``"7d"``, ``"12h"``, ``"1d12h"``, ``"90s"``, ``"2w"`` as a timedelta.

    :raises ValueError: ``text`` is not such a duration
    """
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(number + unit for number, unit in parts) != compact:
        raise ValueError(
            f"{text!r} is not a duration: use a number and a unit w, d, h, m or s, e.g. 7d or 1d12h"
        )
    return timedelta(seconds=sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts))


@dataclass(frozen=True)
class JobSummary:
    """One Batch job made by the executor."""

    job_id: str  # the Batch job id (also its folder in the bucket)
    uid: str  # Batch's unique id of the job, which its log entries carry
    state: str  # Batch's job state: QUEUED, SCHEDULED, RUNNING, SUCCEEDED, FAILED, ...
    task_count: int  # tasks in the job (one per electron slot)
    task_states: dict[str, int]  # tasks per state, as Batch counts them
    created: datetime  # when the job was created
    updated: datetime  # its last state change (for finished jobs: about when it finished)
    flush_reason: str  # why the executor stopped filling it ("idle gap", "full", ...; "" unknown)


@dataclass(frozen=True)
class TaskSummary:
    """One task of a job and the electron it ran."""

    index: int  # BATCH_TASK_INDEX
    state: str  # PENDING, ASSIGNED, RUNNING, SUCCEEDED, FAILED, UNEXECUTED
    attempts: int  # how many times it started running (1 + retries so far)
    exit_code: int | None  # the last attempt's exit code, once one ended
    dispatch_id: str | None  # the Covalent dispatch of its electron (from the manifest)
    node_id: int | None  # the electron's node id in that dispatch
    electron: str | None  # the electron's function name ("" if the manifest did not record it)
    events: tuple[tuple[datetime, str], ...]  # Batch's status events, oldest first


@dataclass(frozen=True)
class TaskLogs:
    """What one task printed."""

    stdout: str  # standard output
    stderr: str  # standard error
    source: str  # "bucket" (the runner's copy, last attempt) or "cloud-logging" (every attempt)
    traceback: str = ""  # the remote traceback from the task's error.pkl, if it is still there


@dataclass
class GcReport:
    """What ``gc`` deleted (or, with ``dry_run``, would delete)."""

    deleted_jobs: list[str] = field(default_factory=list)  # finished jobs deleted from Batch
    deleted_folders: list[str] = field(default_factory=list)  # job folders emptied
    deleted_objects: int = 0  # objects deleted from the bucket
    kept_unfinished: list[str] = field(default_factory=list)  # old jobs still running
    #: unfinished jobs whose lease is older than their orphan_timeout: their executor is gone
    deleted_orphans: list[str] = field(default_factory=list)
    dry_run: bool = False  # nothing was deleted


def _job_id(job: batch_v1.Job) -> str:
    return str(job.name).rsplit("/", 1)[1]


def _summary(job: batch_v1.Job) -> JobSummary:
    groups = job.status.task_groups
    counts = groups["group0"].counts if "group0" in groups else {}
    return JobSummary(
        job_id=_job_id(job),
        uid=job.uid,
        state=job.status.state.name,
        task_count=int(job.task_groups[0].task_count) if job.task_groups else 0,
        task_states={state: int(n) for state, n in counts.items()},
        created=job.create_time,
        updated=job.update_time or job.create_time,
        flush_reason=job.labels.get(FLUSH_REASON_LABEL, "").replace("-", " "),
    )


def _task_summary(task: batch_v1.Task, origin: Any) -> TaskSummary:
    events = list(task.status.status_events)
    attempts = sum(1 for event in events if event.task_state.name == "RUNNING")
    return TaskSummary(
        index=task_index(task),
        state=task.status.state.name,
        attempts=attempts,
        exit_code=task_exit_code(task),
        dispatch_id=None if origin is None else origin.dispatch_id,
        node_id=None if origin is None else origin.node_id,
        electron=None if origin is None else origin.name,
        events=tuple((event.event_time, event.description) for event in events),
    )


class Inspector:
    """Reads and cleans up the executor's jobs in one project, region and bucket.

    :param jobs: the Batch facade for the project and region
    :param store: the executor's bucket and prefix
    :param storage_client: the client behind ``store`` (to list job folders)
    :param logging_client: makes the Cloud Logging client on first use (it is only needed
        when a task's bucket copy of its output is gone)
    :param now: the clock, for ages
    """

    def __init__(
        self,
        jobs: JobsApi,
        store: TaskStore,
        storage_client: storage.Client,
        logging_client: Callable[[], logging_v2.Client],
        *,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self._jobs = jobs
        self._store = store
        self._storage = storage_client
        self._make_logging_client = logging_client
        self._now = now

    async def jobs(self) -> list[JobSummary]:
        """The executor's jobs in the project and region, newest first."""
        return [summary for summary, _ in await self._listed_jobs()]

    async def _listed_jobs(self) -> list[tuple[JobSummary, batch_v1.Job]]:
        found = [(_summary(job), job) for job in await self._jobs.list_jobs()]
        return sorted(found, key=lambda pair: pair[0].created, reverse=True)

    async def tasks(self, job_id: str) -> list[TaskSummary]:
        """Every task of ``job_id`` with the electron it ran (when the manifest is still there).

        :raises BatchApiError: the job does not exist (any more) or cannot be read
        """
        tasks = await self._jobs.list_tasks(job_id)
        manifest = await anyio.to_thread.run_sync(self._store.read_manifest, job_id) or {}
        found = [_task_summary(task, manifest.get(task_index(task))) for task in tasks]
        return sorted(found, key=lambda task: task.index)

    async def logs(self, job_id: str, index: int) -> TaskLogs:
        """What task ``index`` of ``job_id`` printed.

        The runner's copy in the bucket comes first; it exists only once the attempt ended,
        only if the task printed anything, and until its job ended (unless ``keep_objects``). Then
        Cloud Logging is asked, which Batch feeds with every attempt's lines as they happen.

        :raises GCPBatchArrayError: neither has the output, saying why
        """
        ref = TaskRef(job_id, index)
        stdout, stderr = [
            await anyio.to_thread.run_sync(self._store.read_output, ref, obj)
            for obj in (TaskObject.STDOUT, TaskObject.STDERR)
        ]
        if stdout is not None or stderr is not None:
            return TaskLogs(
                (stdout or b"").decode(errors="replace"),
                (stderr or b"").decode(errors="replace"),
                "bucket",
                await self._traceback(ref),
            )
        try:
            job = await self._jobs.get(job_id)
        except GCPBatchArrayError as exc:
            if not isinstance(exc.__cause__, api_exceptions.NotFound):
                raise
            raise GCPBatchArrayError(
                f"task {index} of job {job_id} has no output in gs://{self._store.bucket_name}, "
                f"and the job is gone from Batch, so its log entries cannot be told apart; "
                f"look in the Logs Explorer for log {TASK_LOG} around the job's time"
            ) from exc
        if job.task_groups and not 0 <= index < int(job.task_groups[0].task_count):
            raise GCPBatchArrayError(
                f"job {job_id} has tasks 0 to {int(job.task_groups[0].task_count) - 1}, not {index}"
            )
        return await anyio.to_thread.run_sync(self._cloud_logs, job, index)

    async def _traceback(self, ref: TaskRef) -> str:
        """The traceback in the task's error envelope, verified with its job's key ("" if none)."""
        data = await anyio.to_thread.run_sync(self._store.download, ref, TaskObject.ERROR)
        if data is None:
            return ""
        try:
            job = await self._jobs.get(ref.job_id)
        except GCPBatchArrayError as exc:
            if not isinstance(exc.__cause__, api_exceptions.NotFound):
                raise
            return ""  # the job, and with it the key that verifies error.pkl, is gone
        key_text = job.task_groups[0].task_spec.environment.variables.get(ENV_HMAC_KEY, "")
        failure = decode_error(data, key=parse_job_key(key_text), task=ref)
        return failure.traceback_text

    def _cloud_logs(self, job: batch_v1.Job, index: int) -> TaskLogs:
        client = self._make_logging_client()
        project = str(job.name).split("/")[1]
        since = job.create_time.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        query = (
            f'logName="projects/{project}/logs/{TASK_LOG}" AND labels.job_uid="{job.uid}" '
            f'AND labels.task_id="{job.uid}-group0-{index}" AND timestamp>="{since}"'
        )
        stdout: list[str] = []
        stderr: list[str] = []
        try:
            for entry in client.list_entries(filter_=query, page_size=1000):
                text = entry.payload if isinstance(entry.payload, str) else str(entry.payload)
                (stderr if entry.severity == "ERROR" else stdout).append(text)
        except api_exceptions.GoogleAPICallError as exc:
            raise CloudApiError(
                f"Cloud Logging: listing the entries of task {index} of job {_job_id(job)} "
                f"failed: {exc}. Reading logs needs roles/logging.viewer on the project"
            ) from exc
        if not stdout and not stderr:
            raise GCPBatchArrayError(
                f"task {index} of job {_job_id(job)} has no output in gs://"
                f"{self._store.bucket_name} and none in Cloud Logging (yet): it may not have "
                f"started, printed nothing, or its logs passed their retention period"
            )
        return TaskLogs(_lines(stdout), _lines(stderr), "cloud-logging")

    async def gc(
        self,
        older_than: timedelta,
        *,
        orphan_grace: timedelta = timedelta(hours=1),
        dry_run: bool = False,
    ) -> GcReport:
        """Delete finished jobs, and their bucket folders, older than ``older_than``; and
        orphaned jobs, whatever their age.

        A job counts from its last state change (for a finished job, about when it finished).
        Jobs still running are deleted only when orphaned: QUEUED, SCHEDULED or RUNNING with
        a lease older than the job's own ``orphan_timeout`` (the executor that owned it is
        gone); a job with a fresh lease, no lease or ``orphan_timeout=0`` is only reported.
        Folders whose job is no longer in
        Batch are deleted when their newest object is older than both ``older_than`` and
        ``orphan_grace``: a batch's inputs are uploaded before its job is created, so a young
        folder without a job may belong to a batch that is still filling.
        """
        report = GcReport(dry_run=dry_run)
        now = self._now()
        known: set[str] = set()
        for job, listed in await self._listed_jobs():
            known.add(job.job_id)
            if job.state in UNFINISHED_JOB_STATES and await self._orphaned(listed, now):
                if not dry_run:
                    await self._jobs.delete(job.job_id)
                    report.deleted_objects += await self._delete_folder(job.job_id)
                report.deleted_orphans.append(job.job_id)
                continue
            if now - job.updated < older_than:
                continue
            if job.state not in FINISHED_JOB_STATES:
                report.kept_unfinished.append(job.job_id)
                continue
            if not dry_run:
                report.deleted_objects += await self._delete_folder(job.job_id)
                await self._jobs.delete(job.job_id)
            report.deleted_jobs.append(job.job_id)
        folders = await anyio.to_thread.run_sync(self._folder_ages)
        for job_id, newest in sorted(folders.items()):
            if job_id in known or now - newest < max(older_than, orphan_grace):
                continue
            if not dry_run:
                report.deleted_objects += await self._delete_folder(job_id)
            report.deleted_folders.append(job_id)
        return report

    async def _orphaned(self, job: batch_v1.Job, now: datetime) -> bool:
        """Whether the job's lease is older than the ``orphan_timeout`` it was created with."""
        variables = job.task_groups[0].task_spec.environment.variables if job.task_groups else {}
        try:
            timeout = float(variables.get(ENV_ORPHAN_TIMEOUT, "0"))
        except ValueError:
            return False
        if not timeout > 0:
            return False
        age = await anyio.to_thread.run_sync(self._store.lease_age, _job_id(job), now)
        return age is not None and age > timeout

    async def _delete_folder(self, job_id: str) -> int:
        return await anyio.to_thread.run_sync(self._store.delete_job, job_id)

    def _folder_ages(self) -> dict[str, datetime]:
        """Each job folder under the prefix, with the time its newest object was written."""
        root = self._store.layout("a").folder[: -len("a")]  # "{prefix}/" or ""
        newest: dict[str, datetime] = {}
        blobs: Iterable[Any] = self._storage.list_blobs(self._store.bucket_name, prefix=root)
        try:
            for blob in blobs:
                job_id = blob.name[len(root) :].split("/", 1)[0]
                if not JOB_ID_PATTERN.fullmatch(job_id) or blob.updated is None:
                    continue
                if job_id not in newest or blob.updated > newest[job_id]:
                    newest[job_id] = blob.updated
        except api_exceptions.GoogleAPICallError as exc:
            raise CloudApiError(
                f"Cloud Storage: listing gs://{self._store.bucket_name}/{root} failed: {exc}"
            ) from exc
        return newest


def _lines(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)
