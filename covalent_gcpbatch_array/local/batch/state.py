"""Jobs and tasks of the Batch emulator: their states, status events and JSON.

A :class:`JobRecord` holds one job's tasks and moves them through Google's lifecycles, recording
every change as a status event worded the way Google words them (for example ``Job state is set
from QUEUED to SCHEDULED for job projects/p/locations/l/jobs/j.`` and ``Task state is updated from
RUNNING to FAILED on zones/Z/instances/I with exit code 1.``), and keeping the per-state task
counts that ``GetJob`` reports. It renders itself in Google's JSON. It does not run anything:
the scheduler decides when states change.
"""

from __future__ import annotations

import enum
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio

from covalent_gcpbatch_array.local.batch.spec import JobSpec

__all__ = [
    "FINAL_TASK_STATES",
    "JobRecord",
    "JobState",
    "StatusEvent",
    "TaskRecord",
    "TaskState",
    "rfc3339",
]


class JobState(enum.Enum):
    """Google's job states (``JobStatus.State``), in lifecycle order."""

    QUEUED = "QUEUED"  # admitted and validated, not yet picked up by the scheduler
    SCHEDULED = "SCHEDULED"  # waiting for "VMs": the provisioning delay, then free slots
    RUNNING = "RUNNING"  # at least one task has started running
    SUCCEEDED = "SUCCEEDED"  # every task succeeded
    FAILED = "FAILED"  # every task is done and at least one failed
    DELETION_IN_PROGRESS = "DELETION_IN_PROGRESS"  # being deleted: tasks killed, then gone
    CANCELLATION_IN_PROGRESS = "CANCELLATION_IN_PROGRESS"  # being cancelled: tasks killed
    CANCELLED = "CANCELLED"  # cancelled; kept for inspection


class TaskState(enum.Enum):
    """Google's task states (``TaskStatus.State``)."""

    PENDING = "PENDING"  # waiting for a slot (first attempt, or a retry)
    ASSIGNED = "ASSIGNED"  # holds a slot; its process is being started
    RUNNING = "RUNNING"  # its process runs
    FAILED = "FAILED"  # finished with a non-zero exit code and no retry left
    SUCCEEDED = "SUCCEEDED"  # finished with exit code 0
    UNEXECUTED = "UNEXECUTED"  # never ran: the job ended (was deleted) first


FINAL_TASK_STATES = frozenset({TaskState.FAILED, TaskState.SUCCEEDED, TaskState.UNEXECUTED})
FINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
_STOPPING = frozenset({JobState.DELETION_IN_PROGRESS, JobState.CANCELLATION_IN_PROGRESS})

# Why a reserved exit code happened, in the words of Google's status events
# (cloud.google.com/batch/docs/troubleshooting#reserved-exit-codes).
_EXIT_CODE_REASONS = {
    50001: "due to Spot Preemption",
    50002: "due to Batch no longer receives VM updates",
    50003: "due to VM is rebooted during task execution",
    50004: "due to tasks cannot be canceled",
    50005: "due to task runs over the maximum runtime",
    50006: "due to VM is recreated during task execution",
}
# First "instance id" handed out; Google's look like 19-digit numbers.
_INSTANCE_ID_BASE = 7_000_000_000_000_000_000


def rfc3339(moment: datetime) -> str:
    """A UTC time as Google writes timestamps (``2024-05-01T12:00:00.123456Z``)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _now() -> str:
    return rfc3339(datetime.now(timezone.utc))


def _duration(seconds: float) -> str:
    """A protobuf Duration in JSON: ``"12s"`` or ``"12.500s"``."""
    millis = round(seconds * 1000)
    whole, fraction = divmod(millis, 1000)
    return f"{whole}.{fraction:03d}s" if fraction else f"{whole}s"


@dataclass(slots=True)
class StatusEvent:
    """One entry of ``statusEvents``, for a job or a task."""

    description: str  # Google-worded sentence
    event_time: str  # RFC 3339
    task_state: TaskState | None = None  # the new state, on task events
    exit_code: int | None = None  # ``taskExecution.exitCode``, on events that end an attempt

    def to_json(self) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": "STATUS_CHANGED",
            "description": self.description,
            "eventTime": self.event_time,
        }
        if self.task_state is not None:
            event["taskState"] = self.task_state.value
        if self.exit_code is not None:
            event["taskExecution"] = {"exitCode": self.exit_code}
        return event


@dataclass(slots=True, eq=False)
class TaskRecord:
    """One task of a job's task group."""

    index: int  # BATCH_TASK_INDEX
    state: TaskState = TaskState.PENDING  # current state
    attempt: int = 0  # the current (or last) attempt, 0-based: BATCH_TASK_RETRY_ATTEMPT
    instance: str = ""  # "zones/Z/instances/I" of the current attempt's "VM"
    events: list[StatusEvent] = field(default_factory=list)  # oldest first


@dataclass(eq=False)
class JobRecord:
    """One job: its definition, its tasks, its lifecycle, and the scheduler's bookkeeping."""

    name: str  # projects/P/locations/L/jobs/J
    job_id: str  # J
    uid: str  # unique across re-creations of the same id
    seq: int  # creation order, for fair scheduling and ListJobs order
    spec: JobSpec  # what to run
    output_dir: Path  # where attempts' stdout/stderr are kept
    request_id: str | None = None  # CreateJob's requestId, if given
    state: JobState = JobState.QUEUED  # current state
    create_time: str = field(default_factory=_now)  # RFC 3339
    update_time: str = ""  # RFC 3339, last state change
    events: list[StatusEvent] = field(default_factory=list)  # job-level events, oldest first
    tasks: list[TaskRecord] = field(default_factory=list)  # by index
    counts: Counter[TaskState] = field(default_factory=Counter)  # tasks per state
    pending: deque[int] = field(default_factory=deque)  # task indices waiting for a slot
    running: int = 0  # attempts holding a slot (ASSIGNED or RUNNING)
    provisioned: bool = False  # the provisioning delay is over: tasks may start
    running_since: float | None = None  # monotonic time the job became RUNNING
    finished_at: float | None = None  # monotonic time the job reached a final state
    first_failure: tuple[int, str] | None = None  # (index, event) of the first task that failed
    attempt_scopes: dict[int, anyio.CancelScope] = field(default_factory=dict)  # index -> scope
    drained: anyio.Event | None = None  # made by a delete or cancel; set when no attempt is left
    operation: str = ""  # the name of the delete or cancel operation under way
    hosts_file: Path | None = None  # BATCH_HOSTS_FILE, with requireHostsFile

    def __post_init__(self) -> None:
        self.update_time = self.create_time
        self.tasks = [TaskRecord(index) for index in range(self.spec.task_count)]
        self.counts[TaskState.PENDING] = self.spec.task_count
        self.pending.extend(range(self.spec.task_count))

    @property
    def location(self) -> str:
        return self.name.split("/")[3]

    @property
    def finished(self) -> bool:
        """All tasks have reached a final state."""
        done = sum(self.counts[state] for state in FINAL_TASK_STATES)
        return done == self.spec.task_count

    # -- transitions ------------------------------------------------------------------------

    def set_state(self, new: JobState, detail: str = "") -> None:
        """Move the job to ``new``, recording Google's event (``detail`` is appended)."""
        if new is self.state:
            return
        description = (
            f"Job state is set from {self.state.value} to {new.value} for job {self.name}."
        )
        self.events.append(StatusEvent(description + detail, _now()))
        self.state = new
        self.update_time = self.events[-1].event_time
        if new is JobState.RUNNING:
            self.running_since = time.monotonic()
        elif new in FINAL_JOB_STATES or new in _STOPPING:
            self.finished_at = time.monotonic()

    def set_task_state(
        self,
        task: TaskRecord,
        new: TaskState,
        *,
        exit_code: int | None = None,
        description: str | None = None,
    ) -> StatusEvent:
        """Move ``task`` to ``new`` with Google's event wording, and keep the counts."""
        if description is None:
            where = f" on {task.instance}" if task.instance else ""
            reason = _EXIT_CODE_REASONS.get(exit_code or 0, "")
            description = f"Task state is updated from {task.state.value} to {new.value}{where}"
            description += f" {reason}" if reason else ""
            # Google names the exit code of failures only; success events carry it as data.
            description += f" with exit code {exit_code}." if exit_code else "."
        event = StatusEvent(description, _now(), task_state=new, exit_code=exit_code)
        task.events.append(event)
        self.counts[task.state] -= 1
        self.counts[new] += 1
        task.state = new
        self.update_time = event.event_time
        return event

    def assign(self, task: TaskRecord, instance_serial: int) -> None:
        """Give ``task`` a slot on a fresh "VM" (PENDING -> ASSIGNED)."""
        zone = f"{self.location}-b"
        task.instance = f"zones/{zone}/instances/{_INSTANCE_ID_BASE + instance_serial}"
        self.set_task_state(task, TaskState.ASSIGNED)

    # -- JSON -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The job as ``GetJob`` returns it: the definition echoed, plus the output fields."""
        job = dict(self.spec.echo)
        job["name"] = self.name
        job["uid"] = self.uid
        job["createTime"] = self.create_time
        job["updateTime"] = self.update_time
        job["status"] = self._status_json()
        return job

    def _status_json(self) -> dict[str, Any]:
        if self.running_since is None:
            run_seconds = 0.0
        else:
            end = self.finished_at if self.finished_at is not None else time.monotonic()
            run_seconds = end - self.running_since
        counts = {state.value: str(n) for state, n in self.counts.items() if n}
        status: dict[str, Any] = {
            "state": self.state.value,
            "statusEvents": [event.to_json() for event in self.events],
            "taskGroups": {"group0": {"counts": counts}},
            "runDuration": _duration(run_seconds),
        }
        return status

    def task_name(self, index: int) -> str:
        return f"{self.name}/taskGroups/group0/tasks/{index}"

    def task_json(self, task: TaskRecord) -> dict[str, Any]:
        """One task as ``GetTask`` and ``ListTasks`` return it."""
        return {
            "name": self.task_name(task.index),
            "status": {
                "state": task.state.value,
                "statusEvents": [event.to_json() for event in task.events],
            },
        }
