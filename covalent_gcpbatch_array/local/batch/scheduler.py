"""The Batch emulator's scheduler: the jobs it holds and the task attempts it runs.

:class:`BatchScheduler` answers the job and task RPCs (the HTTP layer only translates) and runs
tasks as local processes through the task launcher. Tasks start whenever a slot frees up: a
task needs its job provisioned (the provisioning delay is over), room under the job's
``parallelism`` and under ``max_running_tasks`` across all jobs. Nothing polls: every event that
can free or create work (a job created or provisioned, an attempt ended, a setting changed, a job
deleted) calls :meth:`BatchScheduler._start_ready_tasks` directly, and each attempt is one task in
the scheduler's task group.

Its RPC methods take and return plain values (names, filter text, records, operations), so any
front end (the REST app in :mod:`.api`, a gRPC server) serves the same state the same way.
DeleteJob and CancelJob answer a long-running operation that is not done: the job sits in
DELETION_IN_PROGRESS or CANCELLATION_IN_PROGRESS for ``deletion_delay`` / ``cancellation_delay``
seconds (its tasks are stopped at once), then is gone or CANCELLED and the operation done.
A job whose definition Google would accept and then fail (see ``JobSpec.scheduling_failure``)
FAILS when it is scheduled.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from covalent_gcpbatch_array.local.api_errors import ApiError
from covalent_gcpbatch_array.local.batch.attempt import (
    EXIT_GENERIC_FAILURE,
    Launcher,
    run_attempt,
    vm_environment,
)
from covalent_gcpbatch_array.local.batch.faults import (
    DEFAULT_OPERATION_DELAY,
    DEFAULT_QUOTA_WINDOW_SECONDS,
    RPC_METHODS,
    CallFaults,
    CreationQuota,
    TaskFaults,
)
from covalent_gcpbatch_array.local.batch.job_filter import JobFilter, order_jobs
from covalent_gcpbatch_array.local.batch.spec import parse_job, validate_job_id
from covalent_gcpbatch_array.local.batch.state import (
    FINAL_JOB_STATES,
    JobRecord,
    JobState,
    TaskRecord,
    TaskState,
    rfc3339,
)

__all__ = ["BatchScheduler", "EmulatorSettings", "EmulatorStats", "Operation"]

logger = logging.getLogger(__name__)

# Google keeps a requestId for 60 minutes.
_REQUEST_ID_TTL = 3600.0
# The knobs configure() takes; jobs_per_minute is jobs_per_window over a 60 s window.
_KNOBS = (
    "provisioning_delay",
    "deletion_delay",
    "cancellation_delay",
    "tasks_hidden_until_provisioned",
    "max_running_tasks",
    "jobs_per_window",
    "quota_window_seconds",
    "jobs_per_minute",
)
# How long a deletion or cancellation waits for the killed tasks to be reaped.
_DELETE_DRAIN_TIMEOUT = 10.0
# "location" of ListJobs' parent meaning every location (projects/P/locations/-).
ALL_LOCATIONS = "-"
# The file requireHostsFile makes, named by BATCH_HOSTS_FILE: the task group's "VMs".
ENV_HOSTS_FILE = "BATCH_HOSTS_FILE"
_DELAYS = ("provisioning_delay", "deletion_delay", "cancellation_delay")


def _check_knob(key: str, value: Any) -> None:
    """:raises ValueError: ``value`` is not a valid value of the knob ``key``"""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if key in _DELAYS:
        if not (number and math.isfinite(value) and value >= 0):
            raise ValueError(f"{key} must be a number >= 0, got {value!r}")
    elif key == "tasks_hidden_until_provisioned":
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
    elif key == "quota_window_seconds":
        if not (number and math.isfinite(value) and value > 0):
            raise ValueError(f"quota_window_seconds must be a number > 0, got {value!r}")
    elif value is not None and not (number and isinstance(value, int) and value >= 1):
        raise ValueError(f"{key} must be an integer >= 1 or null, got {value!r}")


@dataclass
class EmulatorSettings:
    """The realism knobs, changeable at run time."""

    provisioning_delay: float = 0.0  # seconds from a job's creation to its first task start
    max_running_tasks: int | None = None  # cap on attempts running at once, across all jobs
    # seconds a deleted / cancelled job stays DELETION_ / CANCELLATION_IN_PROGRESS
    deletion_delay: float = DEFAULT_OPERATION_DELAY
    cancellation_delay: float = DEFAULT_OPERATION_DELAY
    # no task listed (GetTask: 404) nor counted until the job is provisioned, as Google may
    tasks_hidden_until_provisioned: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "provisioning_delay": self.provisioning_delay,
            "max_running_tasks": self.max_running_tasks,
            "deletion_delay": self.deletion_delay,
            "cancellation_delay": self.cancellation_delay,
            "tasks_hidden_until_provisioned": self.tasks_hidden_until_provisioned,
        }


@dataclass
class EmulatorStats:
    """What the emulator counts for benchmarks."""

    api_calls: Counter[str] = field(default_factory=Counter)  # RPC name -> calls (errors too)
    jobs_created: int = 0  # successful CreateJob calls (not idempotent repeats)
    task_attempts: int = 0  # attempts started, including those failed by a fault at start
    quota_refusals: int = 0  # CreateJob calls answered 429 by the job-creation quota

    def to_json(self) -> dict[str, Any]:
        return {
            "api_calls": {method: self.api_calls[method] for method in RPC_METHODS},
            "jobs_created": self.jobs_created,
            "task_attempts": self.task_attempts,
            "quota_refusals": self.quota_refusals,
        }


@dataclass
class Operation:
    """A long-running operation of DeleteJob or CancelJob."""

    name: str  # projects/P/locations/L/operations/operation-UUID
    target: str  # the job's name
    verb: str  # "delete" or "cancel"
    create_time: str  # RFC 3339
    end_time: str | None = None  # RFC 3339 once done

    @property
    def done(self) -> bool:
        return self.end_time is not None

    def finish(self) -> None:
        self.end_time = rfc3339(datetime.now(timezone.utc))

    def to_json(self) -> dict[str, Any]:
        """The operation in Google's JSON (``google.longrunning.Operation``)."""
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.cloud.batch.v1.OperationMetadata",
            "createTime": self.create_time,
            "target": self.target,
            "verb": self.verb,
            "apiVersion": "v1",
        }
        body: dict[str, Any] = {"name": self.name, "metadata": metadata, "done": self.done}
        if self.end_time is not None:
            metadata["endTime"] = self.end_time
            response = "google.cloud.batch.v1.CancelJobResponse"
            if self.verb == "delete":
                response = "google.protobuf.Empty"
            body["response"] = {"@type": f"type.googleapis.com/{response}"}
        return body


@dataclass(frozen=True)
class _RequestRecord:
    job_name: str  # the job the request created
    fingerprint: bytes  # job id + definition, to tell a repeat from a different request
    expires: float  # monotonic time the request id is forgotten


class BatchScheduler:
    """Holds the jobs, answers the RPCs about them, and runs their tasks.

    :param launcher: starts task processes (``TaskLauncher``), already entered
    :param workdir: where attempts' outputs and jobs' HOME folders go
    :param storage_endpoint: the GCS emulator, given to tasks as ``STORAGE_EMULATOR_HOST``
    :param settings: the initial realism knobs
    :param jobs_per_window: the job-creation quota, creates per window (None: unlimited)
    :param quota_window_seconds: the quota's sliding window (Google's is a minute)
    """

    def __init__(
        self,
        launcher: Launcher,
        *,
        workdir: Path,
        storage_endpoint: str,
        settings: EmulatorSettings | None = None,
        jobs_per_window: int | None = None,
        quota_window_seconds: float = DEFAULT_QUOTA_WINDOW_SECONDS,
    ) -> None:
        self.settings = settings or EmulatorSettings()
        self.stats = EmulatorStats()
        self.call_faults = CallFaults()
        self.task_faults = TaskFaults()
        self.quota = CreationQuota(jobs_per_window, quota_window_seconds)
        self._launcher = launcher
        self._workdir = workdir
        self._storage_endpoint = storage_endpoint
        self._jobs: dict[str, JobRecord] = {}  # by name, in creation order
        self._ready: dict[int, JobRecord] = {}  # by seq: provisioned jobs with pending tasks
        self._requests: dict[str, _RequestRecord] = {}  # by requestId
        self._outputs: dict[str, Path] = {}  # job id -> output folder of the latest such job
        self._operations: dict[str, Operation] = {}  # by name
        self._running = 0  # attempts holding a slot, across all jobs
        self._serial = 0  # job sequence numbers and instance ids
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the scheduler until cancelled; cancelling kills every running task."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            await anyio.sleep_forever()

    # -- settings ---------------------------------------------------------------------------

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change knobs at run time and return all of them (nothing changes on an error).

        The job-creation quota is ``jobs_per_window`` creates in any ``quota_window_seconds``;
        ``jobs_per_minute`` sets both at once (the window back to 60 s, as Google's quota).

        :raises ValueError: an unknown knob, a bad value, or ``jobs_per_minute`` given with
            ``jobs_per_window`` or ``quota_window_seconds``
        """
        unknown = set(changes) - set(_KNOBS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {', '.join(_KNOBS)}")
        if "jobs_per_minute" in changes and changes.keys() & {
            "jobs_per_window",
            "quota_window_seconds",
        }:
            raise ValueError(
                "jobs_per_minute sets the quota and its window (60 s) at once; give it alone, "
                "or give jobs_per_window and quota_window_seconds instead"
            )
        for key, value in changes.items():
            _check_knob(key, value)
        for key in (*_DELAYS, "tasks_hidden_until_provisioned"):
            if key in changes:
                setattr(self.settings, key, changes[key])
        if "max_running_tasks" in changes:
            self.settings.max_running_tasks = changes["max_running_tasks"]
            self._start_ready_tasks()
        if "jobs_per_minute" in changes:
            self.quota.limit = changes["jobs_per_minute"]
            self.quota.window_seconds = DEFAULT_QUOTA_WINDOW_SECONDS
        if "jobs_per_window" in changes:
            self.quota.limit = changes["jobs_per_window"]
        if "quota_window_seconds" in changes:
            self.quota.window_seconds = float(changes["quota_window_seconds"])
        return self.settings_json()

    def settings_json(self) -> dict[str, Any]:
        """Every knob; ``jobs_per_minute`` is the quota when its window is a minute, else null."""
        per_minute = (
            self.quota.limit if self.quota.window_seconds == DEFAULT_QUOTA_WINDOW_SECONDS else None
        )
        return {
            **self.settings.to_json(),
            "jobs_per_window": self.quota.limit,
            "quota_window_seconds": self.quota.window_seconds,
            "jobs_per_minute": per_minute,
        }

    # -- RPCs -------------------------------------------------------------------------------

    def create_job(
        self, parent: str, job_id: str | None, request_id: str | None, body: bytes
    ) -> JobRecord:
        """CreateJob: validate, admit, and start provisioning.

        :raises ApiError: 400 bad id or definition, 409 duplicate id, 429 over the quota
        """
        if job_id:
            validate_job_id(job_id)
        else:
            job_id = f"j-{uuid.uuid4()}"
        if request_id is not None:
            _validate_request_id(request_id)
        name = f"{parent}/jobs/{job_id}"
        spec = parse_job(body, job_name=name, resolve_container=self._launcher.container_argv)
        fingerprint = job_id.encode() + b"\0" + spec.fingerprint
        if request_id is not None:
            replay = self._replay(request_id, fingerprint)
            if replay is not None:
                return replay
        if name in self._jobs:
            raise ApiError.already_exists(
                f"Job {name} already exists; choose another job_id, or delete the old job first"
            )
        try:
            self.quota.check()
        except ApiError:
            self.stats.quota_refusals += 1
            raise

        self._serial += 1
        uid = f"j-{uuid.uuid4()}"  # Google's uids look like this
        job = JobRecord(
            name=name,
            job_id=job_id,
            uid=uid,
            seq=self._serial,
            spec=spec,
            output_dir=self._workdir / "jobs" / job_id / uid,
            request_id=request_id,
        )
        (job.output_dir / "home").mkdir(parents=True, exist_ok=True)
        self._jobs[name] = job
        self._outputs[job_id] = job.output_dir
        self.quota.record()
        self.stats.jobs_created += 1
        self.task_faults.bind_next_job(job_id)
        if request_id is not None:
            expires = time.monotonic() + _REQUEST_ID_TTL
            self._requests[request_id] = _RequestRecord(name, fingerprint, expires)
        self._task_group().start_soon(self._provision, job)
        return job

    def get_job(self, name: str) -> JobRecord:
        """GetJob. :raises ApiError: 404 for an unknown job"""
        job = self._jobs.get(name)
        if job is None:
            raise ApiError.not_found(f"Job {name} not found; check the project, region and job id")
        return job

    def list_jobs(self, parent: str, filter_text: str = "", order_by: str = "") -> list[JobRecord]:
        """ListJobs: the jobs under ``parent`` that pass the filter, in ``order_by`` order.

        ``projects/P/locations/-`` means every location of the project.

        :raises ApiError: 400 for a filter or order the emulator does not understand
        """
        selected = JobFilter(filter_text)
        project, _, location = parent.rpartition("/")
        prefix = f"{project}/" if location == ALL_LOCATIONS else f"{parent}/jobs/"
        jobs = [
            job
            for name, job in self._jobs.items()
            if name.startswith(prefix) and selected.matches(job)
        ]
        return order_jobs(jobs, order_by)

    def delete_job(self, name: str) -> Operation:
        """DeleteJob: stop the job's tasks, then forget the job ``deletion_delay`` s later.

        Tasks that never ran become UNEXECUTED, running ones FAILED. The operation is done
        once the job is gone (at once when the delay is 0 and nothing was running); until then
        GetJob shows it DELETION_IN_PROGRESS and its id cannot be reused.

        :raises ApiError: 404 for an unknown job
        """
        job = self.get_job(name)
        if job.state is JobState.DELETION_IN_PROGRESS:
            return self._operations[job.operation]
        self._stop_tasks(job, "deleted")
        job.set_state(JobState.DELETION_IN_PROGRESS)
        operation = self._new_operation(job, "delete")
        delay = self.settings.deletion_delay
        if delay == 0 and job.running == 0:
            self._forget(job)
            operation.finish()
        else:
            self._task_group().start_soon(self._finish_deletion, job, operation, delay)
        return operation

    def cancel_job(self, name: str) -> Operation:
        """CancelJob: stop the job's tasks; the job is CANCELLED ``cancellation_delay`` s later.

        The job is kept (GetJob, ListTasks still answer), as Google keeps it.

        :raises ApiError: 404 for an unknown job; 400 FAILED_PRECONDITION for a job that has
            ended or is being deleted
        """
        job = self.get_job(name)
        if job.state is JobState.CANCELLATION_IN_PROGRESS:
            return self._operations[job.operation]
        if job.state in FINAL_JOB_STATES or job.state is JobState.DELETION_IN_PROGRESS:
            raise ApiError.failed_precondition(
                f"Job {name} is {job.state.value}: only a job that has not ended can be cancelled"
            )
        self._stop_tasks(job, "cancelled")
        job.set_state(JobState.CANCELLATION_IN_PROGRESS)
        operation = self._new_operation(job, "cancel")
        self._task_group().start_soon(self._finish_cancellation, job, operation)
        return operation

    def get_operation(self, name: str) -> Operation:
        """GetOperation. :raises ApiError: 404 for an unknown operation"""
        operation = self._operations.get(name)
        if operation is None:
            raise ApiError.not_found(f"Operation {name} not found")
        return operation

    def tasks_listed(self, job: JobRecord) -> bool:
        """Whether the job's tasks exist yet for ListTasks, GetTask and GetJob's counts."""
        hidden = self.settings.tasks_hidden_until_provisioned
        waiting = job.state in (JobState.QUEUED, JobState.SCHEDULED) and not job.provisioned
        return not (hidden and waiting)

    def _new_operation(self, job: JobRecord, verb: str) -> Operation:
        location = job.name.rsplit("/jobs/", 1)[0]
        operation = Operation(
            name=f"{location}/operations/operation-{uuid.uuid4()}",
            target=job.name,
            verb=verb,
            create_time=rfc3339(datetime.now(timezone.utc)),
        )
        self._operations[operation.name] = operation
        job.operation = operation.name
        return operation

    def _stop_tasks(self, job: JobRecord, why: str) -> None:
        """Stop every task of ``job`` (idempotent): pending ones UNEXECUTED, running ones FAILED."""
        if job.drained is not None:
            return
        job.drained = anyio.Event()
        self._ready.pop(job.seq, None)
        for index in job.pending:
            job.set_task_state(job.tasks[index], TaskState.UNEXECUTED)
        job.pending.clear()
        for task in job.tasks:
            if task.state in (TaskState.ASSIGNED, TaskState.RUNNING):
                job.set_task_state(
                    task,
                    TaskState.FAILED,
                    description=f"Task state is updated from {task.state.value} to FAILED "
                    f"on {task.instance} because job {job.name} is being {why}.",
                )
        for scope in job.attempt_scopes.values():
            scope.cancel()
        if job.running == 0:
            job.drained.set()

    async def _drained_and_waited(self, job: JobRecord, delay: float) -> None:
        assert job.drained is not None
        with anyio.move_on_after(_DELETE_DRAIN_TIMEOUT):
            await job.drained.wait()
        self._start_ready_tasks()
        # The delay stands for Google stopping the VMs: simulated time, not a synchronisation.
        await anyio.sleep(delay)

    async def _finish_deletion(self, job: JobRecord, operation: Operation, delay: float) -> None:
        await self._drained_and_waited(job, delay)
        self._forget(job)
        operation.finish()

    async def _finish_cancellation(self, job: JobRecord, operation: Operation) -> None:
        await self._drained_and_waited(job, self.settings.cancellation_delay)
        if job.state is JobState.CANCELLATION_IN_PROGRESS:  # not deleted meanwhile
            job.set_state(JobState.CANCELLED)
        operation.finish()

    def _forget(self, job: JobRecord) -> None:
        if self._jobs.get(job.name) is job:
            del self._jobs[job.name]
            self.task_faults.forget_job(job.job_id)
        self._start_ready_tasks()

    def get_task(self, job_name: str, group: str, task_id: str) -> tuple[JobRecord, TaskRecord]:
        """GetTask. :raises ApiError: 404 for an unknown job, group or task"""
        job = self.task_group(job_name, group)
        if (
            not self.tasks_listed(job)
            or not task_id.isdigit()
            or int(task_id) >= job.spec.task_count
        ):
            raise ApiError.not_found(
                f"Task {job.task_name(0).rsplit('/', 1)[0]}/{task_id} not found: task ids are "
                f"the indices 0 to {job.spec.task_count - 1}"
            )
        return job, job.tasks[int(task_id)]

    def task_group(self, job_name: str, group: str) -> JobRecord:
        """The job owning task group ``group``. :raises ApiError: 404 if either is unknown"""
        job = self.get_job(job_name)
        if group != "group0":
            raise ApiError.not_found(
                f"Task group {job_name}/taskGroups/{group} not found; a job has one task "
                f"group, group0"
            )
        return job

    def output_dir(self, job_id: str, index: int, attempt: int) -> Path | None:
        """The folder of an attempt's outputs (kept after the job is deleted)."""
        root = self._outputs.get(job_id)
        return None if root is None else root / "tasks" / str(index) / str(attempt)

    # -- scheduling -------------------------------------------------------------------------

    def _task_group(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise RuntimeError("BatchScheduler.run() is not running")
        return self._tg

    def _replay(self, request_id: str, fingerprint: bytes) -> JobRecord | None:
        """The job an earlier create with this requestId made, if it is a true repeat."""
        record = self._requests.get(request_id)
        if record is None or record.expires < time.monotonic():
            return None
        if record.fingerprint != fingerprint:
            raise ApiError.already_exists(
                f"requestId {request_id} was already used for another CreateJob request "
                f"(job {record.job_name}); use a new requestId for a different job"
            )
        return self._jobs.get(record.job_name)

    async def _provision(self, job: JobRecord) -> None:
        if job.drained is not None:
            return  # deleted before the scheduler got to it
        job.set_state(JobState.SCHEDULED)
        if job.spec.scheduling_failure is not None:
            self._fail_at_scheduling(job, job.spec.scheduling_failure)
            return
        delay = self.settings.provisioning_delay
        if delay > 0:
            # The provisioning delay is simulated time, not a synchronisation.
            await anyio.sleep(delay)
        if job.state is not JobState.SCHEDULED:
            return  # deleted meanwhile
        job.provisioned = True
        if job.spec.require_hosts_file:
            # Every task of the group runs on this one machine.
            job.hosts_file = job.output_dir / "hosts"
            job.hosts_file.write_text("127.0.0.1\n")
        self._ready[job.seq] = job
        self._start_ready_tasks()

    def _fail_at_scheduling(self, job: JobRecord, reason: str) -> None:
        """FAIL an accepted job that cannot be scheduled, naming the field at fault."""
        for index in job.pending:
            job.set_task_state(job.tasks[index], TaskState.UNEXECUTED)
        job.pending.clear()
        job.set_state(JobState.FAILED, f" Job failed at scheduling: {reason}")

    def _start_ready_tasks(self) -> None:
        """Give free slots to pending tasks: oldest job first, lowest index (or retry) first."""
        cap = self.settings.max_running_tasks
        # Higher priority first (Job.priority), then oldest first.
        for _, seq in sorted((-job.spec.priority, seq) for seq, job in self._ready.items()):
            job = self._ready[seq]
            while job.pending and job.running < job.spec.parallelism:
                if cap is not None and self._running >= cap:
                    return
                task = job.tasks[job.pending.popleft()]
                job.running += 1
                self._running += 1
                self._serial += 1
                job.assign(task, self._serial)
                # A local mkdir takes microseconds: cheaper here than a thread hop per attempt.
                output_dir = job.output_dir / "tasks" / str(task.index) / str(task.attempt)
                output_dir.mkdir(parents=True, exist_ok=True)
                self._task_group().start_soon(self._run_attempt, job, task, output_dir)
            if not job.pending:
                del self._ready[seq]

    async def _run_attempt(self, job: JobRecord, task: TaskRecord, output_dir: Path) -> None:
        attempt = task.attempt
        self.stats.task_attempts += 1
        fault = self.task_faults.take(job.job_id, task.index, attempt)
        env = vm_environment(
            job.spec,
            job_id=job.job_id,
            job_uid=job.uid,
            index=task.index,
            attempt=attempt,
            home=job.output_dir / "home",
            storage_endpoint=self._storage_endpoint,
        )
        if job.spec.task_environments:
            # taskEnvironments[i] over the task spec's variables; Batch's own stay on top.
            own = {key: value for key, value in env.items() if key.startswith("BATCH_")}
            env.update(job.spec.task_environments[task.index])
            env.update(own)
        if job.hosts_file is not None:
            env[ENV_HOSTS_FILE] = str(job.hosts_file)
        exit_code: int | None = None
        scope = job.attempt_scopes[task.index] = anyio.CancelScope()
        if job.drained is not None:
            scope.cancel()  # deleted between taking the slot and starting
        try:
            with scope:
                try:
                    exit_code = await run_attempt(
                        self._launcher,
                        job.spec,
                        env=env,
                        output_dir=output_dir,
                        fault=fault,
                        on_running=lambda: self._task_running(job, task),
                    )
                except Exception:
                    # A launcher failure fails this task, never the emulator.
                    logger.exception("attempt %d of task %d of %s", attempt, task.index, job.name)
                    exit_code = EXIT_GENERIC_FAILURE
        finally:
            del job.attempt_scopes[task.index]
            job.running -= 1
            self._running -= 1
            if job.drained is not None and job.running == 0:
                job.drained.set()
        if exit_code is not None and job.drained is None:
            self._attempt_ended(job, task, exit_code)
            self._start_ready_tasks()

    def _task_running(self, job: JobRecord, task: TaskRecord) -> None:
        if job.drained is not None:
            # Its process started just as the job was cancelled or deleted: the task was
            # already stopped (FAILED), and the attempt is being cancelled.
            return
        job.set_task_state(task, TaskState.RUNNING)
        if job.state is JobState.SCHEDULED:
            job.set_state(JobState.RUNNING)

    def _attempt_ended(self, job: JobRecord, task: TaskRecord, exit_code: int) -> None:
        if exit_code == 0:
            job.set_task_state(task, TaskState.SUCCEEDED, exit_code=0)
        elif job.spec.retry_allowed(exit_code, task.attempt):
            job.set_task_state(task, TaskState.FAILED, exit_code=exit_code)
            task.attempt += 1
            job.set_task_state(
                task,
                TaskState.PENDING,
                description=f"Task state is updated from FAILED to PENDING: retry attempt "
                f"{task.attempt} of {job.spec.max_retry_count}.",
            )
            task.instance = ""
            job.pending.appendleft(task.index)
            self._ready[job.seq] = job
        else:
            failure = job.set_task_state(task, TaskState.FAILED, exit_code=exit_code)
            if job.first_failure is None:
                job.first_failure = (task.index, failure.description)
        if job.finished:
            self._finish(job)

    def _finish(self, job: JobRecord) -> None:
        if job.first_failure is None:
            job.set_state(JobState.SUCCEEDED)
            return
        index, event = job.first_failure
        job.set_state(
            JobState.FAILED,
            f"Job failed due to task failure. Specifically, task with index {index} failed "
            f'due to the following task event: "{event}"',
        )


def _validate_request_id(request_id: str) -> None:
    try:
        parsed = uuid.UUID(request_id)
    except ValueError:
        parsed = None
    if parsed is None or parsed.int == 0:
        raise ApiError.invalid_argument(
            "request_id",
            f"{request_id!r} is not a valid request id: Google requires a UUID (not the zero "
            f"UUID), e.g. str(uuid.uuid4())",
        )
